"""Training data: manifest readers, duration filter and dev split, bucketing sampler (caps,
mixing, resume, DDP sharding), resumable feature store, stereo feature layout, batch padding.

The helpers at the top build an OpenDialog-layout corpus from `tools.synth` dialogues; the
trainer tests import them."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from model.data import (
    FEATURE_PAD_VALUE,
    BucketBatchSampler,
    DataConfig,
    DatasetSpec,
    FeatureStore,
    TTSDataset,
    build_feature_store,
    collate,
    compute_features,
    dev_batches,
    load_datasets,
    mux,
    read_manifest,
)
from model.features import FEAT_SCALE, VocosFbank, load_audio
from model.tokenizer import build_espeak_token_table, get_tokenizer, write_tokens
from tools.synth import Voice, synth_dialogue, write_audio

# Fast espeak voices keep the generated dialogues at 4-8 s (tiny training steps on CPU).
FAST_VOICES = [Voice("en-us+m3", 40, 330), Voice("en-us+f3", 68, 350, "female")]
DIALOG_EXTRA = ["[S1]", "[S2]"] + [f"<extra{i}>" for i in range(26)]


def make_corpus(out: Path, n: int, *, seed0: int = 0, stereo: bool = False, lang: str = "en") -> Path:
    """`out/manifest.<lang>.jsonl` + `out/audio/<lang>/<id>.(mp3|wav)`, the OpenDialog layout.
    Stereo dialogues put speaker 1 on channel 0 and speaker 2 on channel 1 (wav)."""
    lines = []
    for i in range(n):
        clip = synth_dialogue(seed0 + i, n_turns=2, sample_rate=24000, voices=FAST_VOICES,
                              pause=(0.1, 0.2), keep_stems=stereo)
        uid = f"{lang}{seed0 + i:04d}"
        if stereo:
            rel = f"audio/{lang}/{uid}.wav"
            write_audio(out / rel, np.stack([clip.stems["S1"], clip.stems["S2"]], axis=1), 24000)
        else:
            rel = f"audio/{lang}/{uid}.mp3"
            write_audio(out / rel, clip.audio, 24000)
        lines.append(json.dumps({"id": uid, "text": clip.truth.transcript, "path": rel}))
    manifest = out / f"manifest.{lang}.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def make_token_files(out: Path) -> tuple[Path, Path]:
    """A ZipVoice-style table (espeak + pinyin) and the dialog table = it + 28 tokens."""
    mono = build_espeak_token_table()
    dialog = dict(mono)
    for tok in DIALOG_EXTRA:
        dialog[tok] = len(dialog)
    out.mkdir(parents=True, exist_ok=True)
    write_tokens(out / "tokens_zipvoice.txt", mono)
    write_tokens(out / "tokens_dialog.txt", dialog)
    return out / "tokens_zipvoice.txt", out / "tokens_dialog.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root, 6)


@pytest.fixture(scope="module")
def stereo_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stereo")
    return make_corpus(root, 2, seed0=100, stereo=True)


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def test_opendialog_jsonl_reads_ids_text_paths_and_header_durations(corpus):
    utts = read_manifest(corpus, dataset="en")
    assert [u.id for u in utts] == [f"en{i:04d}" for i in range(6)]
    for u in utts:
        assert u.text.startswith("[S1]") and "[S2]" in u.text
        assert Path(u.audio).is_file() and Path(u.audio).parent == corpus.parent / "audio" / "en"
        info = sf.info(u.audio)
        assert u.duration == pytest.approx(info.frames / info.samplerate)
        assert 2.0 < u.duration < 12.0 and u.dataset == "en" and u.channels == 1


def test_other_formats_tsv_parquet_lhotse_cuts(corpus, tmp_path):
    utts = read_manifest(corpus)
    a, b = utts[0], utts[1]
    # TSV: relative to the TSV's folder unless a root is given; `_` is the pad symbol.
    tsv = tmp_path / "custom.tsv"
    tsv.write_text(f"x1\t[S1] hello_there   you\t{a.audio}\n"
                   f"x2\t[S1] a [S2] b\t{b.audio}\t0.5\t2.0\n", encoding="utf-8")
    t = read_manifest(tsv)
    assert t[0].text == "[S1] hello there you" and t[0].duration == pytest.approx(a.duration)
    assert (t[1].start, t[1].end, t[1].duration) == (0.5, 2.0, 1.5)
    feats = compute_features(t[1])
    assert feats.shape == (round(1.5 * 24000 / 256), 100)

    # The pipeline's Parquet export: only status == "ok" rows, paths relative to the export dir.
    export = corpus.parent
    table = pa.table({"segment_id": ["s1", "s2"], "path": [str(Path(a.audio).relative_to(export)),
                                                          str(Path(b.audio).relative_to(export))],
                      "text": [a.text, b.text], "duration": [a.duration, None],
                      "status": ["ok", "rejected"], "language": ["en", "en"]})
    pq.write_table(table, export / "segments.parquet")
    p = read_manifest(export / "segments.parquet")
    assert [u.id for u in p] == ["s1"] and p[0].audio == a.audio

    # lhotse MonoCut lines (written by lhotse itself), with cached string tokens.
    import lhotse  # a test dependency (pyproject: test extra)
    rec = lhotse.Recording.from_file(a.audio, recording_id="r1")
    sup = lhotse.SupervisionSegment(id="c1", recording_id="r1", start=0.0, duration=2.0,
                                    text="[S1] hi_you", custom={"tokens": ["[S1]", "h", "i"]})
    cut = lhotse.MonoCut(id="c1", start=1.0, duration=2.0, channel=0, recording=rec,
                         supervisions=[sup])
    with gzip.open(export / "cuts.en.jsonl.gz", "wt") as f:
        f.write(json.dumps(cut.to_dict()) + "\n")
    c = read_manifest(export / "cuts.en.jsonl.gz")
    assert (c[0].id, c[0].text, c[0].tokens) == ("c1", "[S1] hi you", ["[S1]", "h", "i"])
    assert (c[0].start, c[0].end, c[0].audio) == (1.0, 3.0, a.audio)


@pytest.mark.parametrize("name,content,message", [
    ("m.jsonl", '{"id": "a", "text": "[S1] x"}\n', "m.jsonl:1: missing field(s) ['path']"),
    ("m.jsonl", '{"id": "a", "text": "x", "path": "a.wav", "duration": 2}\nnot json\n',
     "m.jsonl:2: not valid JSON"),
    ("m.tsv", "a\tb\n", "m.tsv:1: expected 'id<TAB>text<TAB>wav[<TAB>start<TAB>end]'"),
    ("m.tsv", "a\tb\tc.wav\tx\t2\n", "m.tsv:1: start/end must be numbers"),
    ("m.jsonl", '{"id": "a", "text": "x", "path": "a.wav", "duration": 2}\n'
                '{"id": "a", "text": "y", "path": "b.wav", "duration": 2}\n', "duplicate utterance id 'a'"),
    ("m.csv", "a,b\n", "unknown manifest format"),
    ("m.jsonl", '{"id": "a", "text": "x", "path": "missing.mp3"}\n', "audio of 'a' not found"),
])
def test_bad_manifests_name_the_file_and_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        read_manifest(tmp_path / name)
    assert message in str(err.value) and str(tmp_path) in str(err.value)


# --------------------------------------------------------------------------------------------
# Splits and filters
# --------------------------------------------------------------------------------------------


def _durations_manifest(path: Path, durations: dict[str, float], text="[S1] a [S2] b") -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": text, "path": f"{k}.mp3", "duration": d}) + "\n"
                            for k, d in durations.items()), encoding="utf-8")
    return path


def test_duration_filter_and_dev_split(tmp_path):
    durs = {"u05": 0.5, "u01": 2.0, "u03": 31.0, "u02": 3.0, "u04": 45.0, "u00": 5.0, "u06": 10.0}
    m = _durations_manifest(tmp_path / "a.jsonl", durs)
    cfg = DataConfig(train=[DatasetSpec(name="a", manifest=str(m))], dev_size=2, max_duration=100)
    train, dev = load_datasets(cfg)
    # dev = the first 2 ids after sorting (u00, u01), then the 1-30 s filter on both sets
    assert [u.id for u in dev.utts] == ["u00", "u01"]
    assert [u.id for u in train.utts] == ["u02", "u06"]
    cfg60 = cfg.model_copy(update={"max_len": 60.0})
    assert [u.id for u in load_datasets(cfg60)[0].utts] == ["u02", "u03", "u04", "u06"]
    ids = tmp_path / "dev.txt"
    ids.write_text("u06\nu02\n")
    train, dev = load_datasets(cfg.model_copy(update={"dev_ids": str(ids)}))
    assert [u.id for u in dev.utts] == ["u02", "u06"] and [u.id for u in train.utts] == ["u00", "u01"]
    # Dialogue stages refuse texts that do not start with [S1].
    _durations_manifest(tmp_path / "b.jsonl", {"x": 2.0, "y": 3.0}, text="hello [S1] there")
    bad = DataConfig(train=[DatasetSpec(name="b", manifest=str(tmp_path / "b.jsonl"))], dev_size=0)
    with pytest.raises(ValueError, match=r"b.jsonl: dialogue text must start with \[S1\]"):
        load_datasets(bad, require_dialog=True)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def _sampler(durations, sources=None, **kw):
    sources = sources if sources is not None else [np.arange(len(durations))]
    return BucketBatchSampler(durations, sources, **kw)


def test_bucketing_caps_batches_by_total_seconds_and_groups_durations():
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 30, size=3000)
    s = _sampler(d, max_duration=200, num_buckets=10, buffer_size=1000, drop_last=False, seed=3)
    plan = s.epoch_batches(1)
    assert all(d[b].sum() <= 200 for b in plan)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(3000))  # every utterance once (drop_last False)
    # Buckets: the duration spread inside a batch is far below that of random batches.
    spread = np.mean([d[b].std() for b in plan if len(b) > 1])
    assert spread < 0.25 * d.std()
    # Full batches are nearly full: sum close to the cap.
    full = [d[b].sum() for b in plan[: len(plan) // 2]]
    assert np.median(full) > 200 - 30
    # Deterministic in (seed, epoch); another epoch is another order.
    again = _sampler(d, max_duration=200, num_buckets=10, buffer_size=1000, drop_last=False, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(plan, again.epoch_batches(1)))
    assert not all(np.array_equal(x, y) for x, y in zip(plan, s.epoch_batches(2)))
    with pytest.raises(ValueError, match="longer than max_duration"):
        _sampler(np.array([5.0, 50.0]), max_duration=20)


def test_mixing_weights_repeat_and_mux():
    d = np.full(400, 2.0)
    en, zh = np.arange(0, 300), np.arange(300, 400)
    s = _sampler(d, [en, zh], repeats=[1, 2], max_duration=20, drop_last=False, seed=1)
    assert s.weights == [300.0, 200.0]  # the reference's mux weights: counts after repetition
    flat = np.concatenate(s.epoch_batches(1))
    counts = np.bincount(flat, minlength=400)
    assert (counts[en] == 1).all() and (counts[zh] == 2).all()
    # Explicit weights 3:1 on equal sizes: the first part of the stream is ~75% source 0.
    rng = np.random.default_rng(7)
    a, b = np.arange(0, 2000), np.arange(2000, 4000)
    stream = mux([a, b], [3.0, 1.0], rng)
    assert sorted(stream.tolist()) == list(range(4000))
    head = stream[:1000]
    assert 0.70 < np.mean(head < 2000) < 0.80
    # counts as weights spread the sources evenly over the whole stream
    even = mux([a[:1500], b[:500]], [1500.0, 500.0], rng)
    for part in np.array_split(even, 4):
        assert 0.65 < np.mean(part < 2000) < 0.85


def test_sampler_state_restores_mid_epoch():
    d = np.random.default_rng(1).uniform(1, 10, size=500)
    s = _sampler(d, max_duration=40, num_buckets=5, buffer_size=200, seed=5)
    s.set_epoch(3)
    it = iter(s)
    seen = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 3 and state["position"] == 7
    rest = list(it)
    fresh = _sampler(d, max_duration=40, num_buckets=5, buffer_size=200, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert list(fresh) == rest and len(seen) + len(rest) == len(s)
    fresh.set_epoch(4)
    assert len(list(fresh)) > 0 and fresh.state_dict()["epoch"] == 4


def test_ddp_ranks_get_disjoint_equal_shares_of_one_plan():
    d = np.random.default_rng(2).uniform(1, 10, size=700)
    full = _sampler(d, max_duration=30, num_buckets=4, buffer_size=300, seed=9).global_plan(1)
    ranks = [_sampler(d, max_duration=30, num_buckets=4, buffer_size=300, seed=9, world_size=3,
                      rank=r).epoch_batches(1) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(full) // 3
    for r, batches in enumerate(ranks):
        assert all(np.array_equal(b, full[r + 3 * i]) for i, b in enumerate(batches))
    used = np.concatenate([np.concatenate(r) for r in ranks])
    assert len(used) == len(set(used.tolist()))


def test_dev_batches_cover_the_dev_set_once():
    from model.data import DataSplit, Utterance

    utts = [Utterance(id=f"u{i}", text="", audio="", duration=float(1 + i % 7)) for i in range(30)]
    split = DataSplit(utts, [np.arange(30)], [])
    parts = [dev_batches(split, 12.0, world_size=2, rank=r) for r in range(2)]
    flat = sorted(int(i) for p in parts for b in p for i in b)
    assert flat == list(range(30))
    assert all(sum(utts[i].duration for i in b) <= 12.0 for p in parts for b in p)


# --------------------------------------------------------------------------------------------
# Features, store, batches
# --------------------------------------------------------------------------------------------


def test_feature_store_resumes_without_redoing_finished_shards(corpus, tmp_path):
    utts = read_manifest(corpus)
    out = tmp_path / "store"
    # A run that stops after one shard (the budget stands in for a kill).
    first = build_feature_store(utts, out, shard_size=2, tokenizer="dialog", max_shards=1)
    assert first["computed"] == [0] and not first["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(out)
    done0 = (out / "shards" / "00000.safetensors").stat().st_mtime_ns
    # A kill in the middle of shard 1: its feature file exists, its index (the marker) does not.
    (out / "shards" / "00001.safetensors").write_bytes(b"partial")
    second = build_feature_store(utts, out, shard_size=2, tokenizer="dialog")
    assert second["skipped"] == [0] and second["computed"] == [1, 2] and second["complete"]
    assert (out / "shards" / "00000.safetensors").stat().st_mtime_ns == done0
    third = build_feature_store(utts, out, shard_size=2, tokenizer="dialog")
    assert third["computed"] == [] and third["skipped"] == [0, 1, 2]

    store = FeatureStore(out)
    store.MAX_OPEN = 2  # 3 shards: handles are recycled
    tok = get_tokenizer("dialog", None)
    for u in utts + utts[::-1]:
        ref = compute_features(u)
        got = store.get(u.id)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.allclose(got, ref, atol=0.02)  # float16 storage
        assert store.num_frames[u.id] == ref.shape[0]
        assert store.tokens[u.id] == tok.texts_to_tokens([u.text])[0]
    assert len(store._handles) == 2
    with pytest.raises(ValueError, match="store has channels=1"):
        build_feature_store(utts, out, shard_size=3)


def test_stereo_features_are_ch0_ch1_mix(stereo_corpus, tmp_path):
    utts = read_manifest(stereo_corpus, channels=2, dataset="st")
    feats = compute_features(utts[0])
    wave = load_audio(utts[0].audio, mono=False)
    assert wave.shape[0] == 2 and feats.shape[1] == 300
    mono = VocosFbank(num_channels=1)
    assert torch.allclose(feats[:, :100], mono.extract(wave[0], 24000))
    assert torch.allclose(feats[:, 100:200], mono.extract(wave[1], 24000))
    assert torch.allclose(feats[:, 200:], mono.extract(wave.mean(axis=0), 24000))
    # the two speakers really are on different channels
    assert not torch.allclose(feats[:, :100], feats[:, 100:200], atol=1.0)
    # a mono file in a stereo dataset is refused with its name
    mono_utts = read_manifest(stereo_corpus, channels=2)
    mono_path = tmp_path / "mono.wav"
    sf.write(mono_path, wave[0], 24000)
    mono_utts[0].audio = str(mono_path)
    with pytest.raises(ValueError, match="mono.wav: stereo dataset .* needs 2-channel audio"):
        compute_features(mono_utts[0])
    # store + dataset + collate keep the 300-dim layout
    build_feature_store(utts, tmp_path / "st", channels=2, shard_size=4, dtype="float32")
    store = FeatureStore(tmp_path / "st")
    assert torch.equal(store.get(utts[0].id), feats)


def test_batches_are_scaled_and_padded_with_lhotse_value(corpus, tmp_path):
    _, dialog_tokens = make_token_files(tmp_path)
    cfg = DataConfig(train=[DatasetSpec(name="en", manifest=str(corpus))], dev_size=0)
    train, _ = load_datasets(cfg, require_dialog=True)
    ds = TTSDataset(train, get_tokenizer("dialog", dialog_tokens))
    items = [ds[0], ds[1]]
    batch = collate(items)
    assert FEATURE_PAD_VALUE == pytest.approx(math.log(1e-10) * 0.1) == pytest.approx(-2.302585)
    lens = batch["features_lens"]
    assert lens.tolist() == [it["features"].shape[0] for it in items]
    short = int(lens.argmin())
    assert torch.all(batch["features"][short, lens[short]:] == torch.tensor(FEATURE_PAD_VALUE))
    assert torch.allclose(batch["features"][short, : lens[short]], items[short]["features"] * FEAT_SCALE)
    s1 = ds.tokenizer.token2id["[S1]"]
    assert all(t[0] == s1 and ds.tokenizer.token2id["[S2]"] in t for t in batch["tokens"])
    assert batch["duration"] == pytest.approx(float(lens.sum()) / 93.75)


def test_unreadable_audio_is_recorded_and_left_out_of_the_training_set(corpus, tmp_path):
    from model.prepare import main as prepare_main

    (tmp_path / "broken.mp3").write_bytes(b"\x00" * 2000)
    lines = corpus.read_text().splitlines()[:2]
    lines.append(json.dumps({"id": "zz_broken", "text": "[S1] a [S2] b", "path": str(tmp_path / "broken.mp3")}))
    manifest = tmp_path / "manifest.en.jsonl"
    manifest.write_text("\n".join(lines).replace('"audio/', f'"{corpus.parent}/audio/') + "\n")
    assert prepare_main(["--manifest", str(manifest), "--out", str(tmp_path / "fbank" / "x")]) == 0
    store = FeatureStore(tmp_path / "fbank" / "x")
    assert set(store.failed) == {"zz_broken"} and "broken.mp3" in store.failed["zz_broken"]
    cfg = DataConfig(train=[DatasetSpec(name="x", manifest=str(manifest))], dev_size=0,
                     feature_store=str(tmp_path / "fbank"))
    train, _ = load_datasets(cfg)
    assert [u.id for u in train.utts] == ["en0000", "en0001"]
    assert [u.duration for u in train.utts] == [store.num_frames[i] / 93.75 for i in ("en0000", "en0001")]
    # a dataset that is not in its store at all is an error naming the store
    cfg_missing = cfg.model_copy(update={"train": [DatasetSpec(name="y", manifest=str(manifest))]})
    with pytest.raises(FileNotFoundError, match="model.prepare"):
        load_datasets(cfg_missing)
