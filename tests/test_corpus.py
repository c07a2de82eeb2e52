"""The corpus is exactly what the manifests say: scores computed once and filtered many times, the
export published whole (also when the run is killed), a one-run report funnel, and the interop
files read by their own libraries (lhotse, pyannote, Hugging Face datasets).

Runs: ingest -> segments cut from the example's known truth turns (tests.robust_stages:TruthSegments,
instead of the ASR chain) -> real DNSMOS -> real export, on two example files (en + zh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from pipeline import corpus, manifests
from pipeline.config import parse_config
from pipeline.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples"
INPUTS = [str(EXAMPLE / "audio" / "dlg_clean_en.wav"), str(EXAMPLE / "audio" / "dlg_zh.m4a")]


@pytest.fixture(scope="module", autouse=True)
def ship_test_stages():
    """Ray workers get the test stages by value (tests/ need not be importable there)."""
    import ray.cloudpickle

    from tests import robust_stages

    ray.cloudpickle.register_pickle_by_value(robust_stages)
    yield
    ray.cloudpickle.unregister_pickle_by_value(robust_stages)


def config(out: Path, min_ovrl: float) -> dict:
    return {
        "run": {"output": str(out), "progress": False},
        "stages": {
            "ingest": {},
            "segments": {"uses": "tests.robust_stages:TruthSegments", "truth_dir": str(EXAMPLE / "truth")},
            "quality": {"min_ovrl": min_ovrl},
            "export": {},
        },
    }


def run(out: Path, min_ovrl: float, inputs=INPUTS):
    return run_pipeline(parse_config(config(out, min_ovrl)), inputs)


def score_parts(out: Path) -> dict[str, int]:
    """The stored DNSMOS scores: each file is one batch the model scored."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cache" / "scores").rglob("*.parquet")}


def corpus_audio(out: Path) -> set[str]:
    return {p.relative_to(out / "export").as_posix() for p in (out / "export" / "audio").rglob("*") if p.is_file()}


def kept(out: Path, stage: str) -> dict[str, dict]:
    return {r["segment_id"]: r for r in manifests.read_manifest(out, stage).to_pylist() if r["status"] == "ok"}


def assert_mirrors_manifests(out: Path) -> dict[str, dict]:
    exported = kept(out, "export")
    assert corpus.check(out) == []
    assert corpus_audio(out) == {r["path"] for r in exported.values()}  # no orphan, none missing
    assert set(exported) == set(kept(out, "quality"))
    segs = manifests.read_manifest_file("export", out / "export" / "segments.parquet").to_pylist()
    assert {r["segment_id"] for r in segs} == set(exported)
    info = json.loads((out / "export" / "corpus.json").read_text())
    stages = json.loads((out / "run_config.json").read_text())["stages"]
    assert info["segments"] == len(exported) and info["fingerprint"] == stages[-1]["fingerprint"]
    return exported


def assert_monotone_funnel(out: Path) -> list[dict]:
    funnel = json.loads((out / "report" / "report.json").read_text())["funnel"]
    ledger = manifests.read_manifest(out, "ledger")
    assert funnel[0]["files"] == ledger.num_rows
    for key in ("files", "audio_seconds", "segments", "speech_seconds"):
        values = [r[key] for r in funnel if r[key] is not None]
        assert values == sorted(values, reverse=True), (key, values)
    return funnel


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    """Three runs into one output: everything kept, a stricter DNSMOS cutoff, the first cutoff again."""
    out = tmp_path_factory.mktemp("corpus") / "out"
    res = {"out": out}
    run(out, 1.0)
    res["all"] = assert_mirrors_manifests(out)
    res["scores"] = {k: r["dnsmos_ovrl"] for k, r in kept(out, "quality").items()}
    res["parts"] = score_parts(out)
    res["store"] = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "export").rglob("*.mp3")}
    res["funnel_all"] = assert_monotone_funnel(out)
    ranked = sorted(res["scores"].values())
    res["cutoff"] = round((ranked[-2] + ranked[-3]) / 2, 4)  # keeps the two best segments
    run(out, res["cutoff"])
    res["strict"] = assert_mirrors_manifests(out)
    res["strict_parts"] = score_parts(out)
    res["strict_store"] = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "export").rglob("*.mp3")}
    res["strict_ledger"] = {r["source_path"]: r for r in manifests.read_manifest(out, "ledger").to_pylist()}
    run(out, 1.0)
    res["again"] = assert_mirrors_manifests(out)
    res["again_parts"] = score_parts(out)
    return res


def test_a_stricter_cutoff_refilters_stored_scores_and_the_corpus_follows(runs):
    out, scores = runs["out"], runs["scores"]
    assert len(runs["all"]) == 5 and runs["parts"]  # 3 en + 2 zh segments, scored once
    strict = runs["strict"]
    assert set(strict) == {k for k, v in scores.items() if v >= runs["cutoff"]} and len(strict) == 2
    # The model was not called again: no new score part, none rewritten.
    assert runs["strict_parts"] == runs["parts"]
    # The kept segments' audio was not encoded again (same store files), the others' left the corpus.
    assert all(runs["strict_store"][k] == runs["store"][k] for k in runs["strict_store"])
    zh = runs["strict_ledger"][INPUTS[1]]
    assert (zh["status"], zh["stage"]) == ("rejected", "quality") and zh["reason"].startswith("low_quality")
    # Lowered again: every segment is back with the same scores, still without scoring.
    assert set(runs["again"]) == set(runs["all"])
    assert {k: r["dnsmos_ovrl"] for k, r in kept(out, "quality").items()} == scores
    assert runs["again_parts"] == runs["parts"]


def test_report_funnel_is_one_run_and_monotone(runs, tmp_path):
    funnel = runs["funnel_all"]
    assert [r["row"] for r in funnel] == ["input", "ingest", "segments", "quality", "export"]
    assert funnel[0]["files"] == 2 and funnel[-1]["segments"] == 5
    md = (runs["out"] / "report" / "report.md").read_text()
    assert "| input | input files (ledger rows) | 2 |" in md and "100.0%" in md
    # A run on a subset of the inputs into the same output: the funnel covers that run's ledger.
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out, symlinks=True)
    res = run(out, 1.0, INPUTS[:1])
    assert res.processed == 0  # everything was done before
    funnel = assert_monotone_funnel(out)
    assert funnel[0]["files"] == 1 and funnel[-1]["segments"] == 3
    costs = json.loads((out / "report" / "report.json").read_text())["costs"]
    # Nothing ran: no worker time in this run, the earlier runs' time shown as reused.
    assert all(c["this_run_worker_seconds"] == 0 for c in costs)
    assert next(c for c in costs if c["stage"] == "ingest")["reused_worker_seconds"] > 0
    assert len(assert_mirrors_manifests(out)) == 3
    assert (out / "report" / "distributions.png").stat().st_size > 5000


def test_interop_files_load_with_their_libraries_after_moving_the_corpus(runs, tmp_path):
    from pyannote.database.util import load_rttm

    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(runs["out"] / "export", moved)
    assert corpus.check(moved) == []
    truth = {lang: json.loads((EXAMPLE / "truth" / name).read_text())
             for lang, name in (("en", "dlg_clean_en.json"), ("zh", "dlg_zh.json"))}
    segs = {r["segment_id"]: r for r in manifests.read_manifest_file("export", moved / "segments.parquet").to_pylist()}
    n = 0
    for lang in ("en", "zh"):
        for cut in corpus.load_cuts(moved, lang):
            n += 1
            seg = segs[cut.id]
            sups = sorted(cut.supervisions, key=lambda s: s.start)
            assert [s.speaker for s in sups] == ["S1", "S2", "S1", "S2"][:len(sups)] and len(sups) >= 2
            # The spans tile the speech: each is a truth turn moved into the file's time.
            turns = [t for t in truth[lang]["turns"] if not t["is_backchannel"]
                     and t["start"] >= seg["start"] - 1e-3 and t["end"] <= seg["end"] + 1e-3]
            assert [x for s in sups for x in (s.start, s.end)] == \
                pytest.approx([x for t in turns for x in (t["start"] - seg["start"], t["end"] - seg["start"])], abs=2e-3)
            assert all(a.end <= b.start for a, b in zip(sups, sups[1:])) and sups[-1].end <= cut.duration + 1e-6
            assert " ".join(f"[{s.speaker}] {s.text}" for s in sups) == seg["text"] == cut.custom["text"]
            audio = cut.load_audio()
            assert audio.shape == (1, cut.recording.num_samples) and cut.sampling_rate == 24000
            rttm = load_rttm(moved / "rttm" / lang / f"{cut.id}.rttm")[cut.id]
            tracks = list(rttm.itertracks(yield_label=True))
            assert [lbl for _, _, lbl in tracks] == [s.speaker for s in sups]
            assert [x for seg_, _, _ in tracks for x in (seg_.start, seg_.end)] == \
                pytest.approx([x for s in sups for x in (s.start, s.end)], abs=2e-3)
    assert n == 5

    import datasets

    ds = datasets.load_dataset("audiofolder", data_dir=str(moved), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["id"]) == sorted(segs)
    item = ds[0]
    assert item["audio"]["sampling_rate"] == 24000
    assert len(item["audio"]["array"]) == sf.info(moved / segs[item["id"]]["path"]).frames

    # Every stage's manifest alone, and all of them with the stage as a column.
    verdicts = manifests.read_stages(runs["out"])
    assert set(verdicts.column("stage").to_pylist()) == {"ingest", "segments", "quality", "export"}

    # check names what disagrees: an orphan file, a missing one.
    extra = moved / "audio" / "en" / "orphan.mp3"
    shutil.copy(moved / next(iter(segs.values()))["path"], extra)
    (moved / segs[sorted(segs)[-1]]["path"]).unlink()
    problems = corpus.check(moved)
    assert any("1 files not in segments.parquet" in p and "orphan.mp3" in p for p in problems), problems
    assert any("1 listed files missing" in p for p in problems), problems


def test_sigkill_during_export_leaves_a_whole_corpus(runs, tmp_path):
    """A run that changes the corpus is killed while it builds the new one: export/ is the whole
    previous corpus; the next run publishes the whole new one."""
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out, symlinks=True)
    before = {p: (out / "export" / p).read_bytes() for p in corpus_audio(out)}
    cfg = tmp_path / "strict.yaml"
    cfg.write_text(yaml.safe_dump(config(out, runs["cutoff"]), sort_keys=False))
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(cfg), *INPUTS, "--no-progress"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and not list(out.glob(".export.new-*")) and proc.poll() is None:
            time.sleep(0.002)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run.log").read_text()[-3000:]
    assert corpus.check(out) == []
    now = {p: (out / "export" / p).read_bytes() for p in corpus_audio(out)}
    assert now == before or set(now) == {r["path"] for r in runs["strict"].values()}
    run(out, runs["cutoff"])
    assert set(assert_mirrors_manifests(out)) == set(runs["strict"])
    assert not list(out.glob(".export.*"))


def test_swap_is_whole_under_sigkill_at_any_moment(tmp_path):
    """The publishing step alone, killed at spread-out moments: the folder holds one whole
    version, and recover() (the next run) cleans up."""
    root = tmp_path / "export"

    def version(d: Path, tag: str, n: int) -> None:
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"f{i:04d}.txt").write_text(tag)
        (d / "corpus.json").write_text(json.dumps({"tag": tag, "n": n}))

    version(root, "old", 300)
    script = ("import sys, shutil; from pathlib import Path; from pipeline import corpus\n"
              "root = Path(sys.argv[1]); st = root.with_name('.export.new-1')\n"
              "shutil.rmtree(st, ignore_errors=True); st.mkdir()\n"
              "for i in range(600): (st / f'f{i:04d}.txt').write_text('new')\n"
              "(st / 'corpus.json').write_text('{\"tag\": \"new\", \"n\": 600}')\n"
              "corpus.swap_in(st, root)\n")
    seen = set()
    for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0):
        p = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        corpus.recover(root)
        info = json.loads((root / "corpus.json").read_text())
        files = {f.read_text() for f in root.glob("f*.txt")}
        assert files == {info["tag"]} and len(list(root.glob("f*.txt"))) == info["n"]
        assert not list(tmp_path.glob(".export.*"))
        seen.add(info["tag"])
        if info["tag"] == "new":
            shutil.rmtree(root)
            version(root, "old", 300)
    assert "old" in seen


def test_interrupted_two_rename_swap_is_recovered(tmp_path, monkeypatch):
    """Where the file system cannot exchange two folders: killed between the two renames, the
    previous corpus is put back."""
    root = tmp_path / "export"
    root.mkdir()
    (root / "corpus.json").write_text("old")
    os.rename(root, tmp_path / ".export.old")  # the state a kill between the renames leaves
    (tmp_path / ".export.new-7").mkdir()
    assert corpus.check(root)[0].endswith("(a swap was interrupted: the next run puts it back)")
    corpus.recover(root)
    assert (root / "corpus.json").read_text() == "old" and not list(tmp_path.glob(".export.*"))
    monkeypatch.setattr(corpus, "_exchange", lambda a, b: False)
    new = tmp_path / ".export.new-8"
    new.mkdir()
    (new / "corpus.json").write_text("new")
    corpus.swap_in(new, root)
    assert (root / "corpus.json").read_text() == "new" and not list(tmp_path.glob(".export.*"))


def test_classifier_verdicts_are_stored_and_a_threshold_refilters_them(tmp_path, monkeypatch):
    import copy

    from pipeline.backends.llm.heuristic import HeuristicClassifier
    from pipeline.stage import StageContext
    from pipeline.stages.classification import ClassificationConfig, ClassificationStage
    from test_classification import two_speaker_row

    calls: list[int] = []
    classify = HeuristicClassifier.classify
    monkeypatch.setattr(HeuristicClassifier, "classify", lambda self, rows: calls.append(len(rows)) or classify(self, rows))
    rows = [two_speaker_row(f"r{i}", ["Did you see the lake?", "Yes, on Sunday.", "Was it cold?", "Very."] * (i + 1))
            for i in range(3)]

    def classify_with(**cfg):
        st = ClassificationStage(ClassificationConfig(**cfg), StageContext("classification", tmp_path))
        return st.process(copy.deepcopy(rows))

    loose = classify_with(threshold=0.0)
    assert calls == [3] and all(r["status"] == "ok" for r in loose)
    strict = classify_with(threshold=1.0)
    assert calls == [3]  # the stored verdicts, re-filtered
    assert [r["dialogue_score"] for r in strict] == [r["dialogue_score"] for r in loose]
    assert all(r["status"] == "rejected" for r in strict if r["dialogue_score"] < 1.0)
    classify_with(threshold=0.0, heuristic={"min_alternations": 2})  # a scoring change
    assert calls == [3, 3]


def test_vad_probabilities_are_stored_and_thresholds_rederive_the_spans(tmp_path, monkeypatch):
    from pipeline.backends.vad.silero import SileroVad
    from pipeline.stage import StageContext
    from pipeline.stages.vad import VadConfig, VadStage

    calls: list[int] = []
    probabilities = SileroVad.probabilities
    monkeypatch.setattr(SileroVad, "probabilities", lambda self, paths, **kw: calls.append(len(paths)) or
                        probabilities(self, paths, **kw))
    wav = EXAMPLE / "audio" / "dlg_clean_en.wav"  # 16 kHz mono: its own analysis copy
    row = {"recording_id": "r", "source_path": str(wav), "audio_path": str(wav), "duration": sf.info(wav).duration}

    def vad(out: Path, **cfg) -> dict:
        return VadStage(VadConfig(**cfg), StageContext("vad", out)).process([dict(row)])[0]

    a = vad(tmp_path / "a", threshold=0.5)
    b = vad(tmp_path / "a", threshold=0.9, min_silence_duration=0.5)
    assert calls == [1]  # the second threshold set re-used the stored probabilities
    fresh = vad(tmp_path / "b", threshold=0.9, min_silence_duration=0.5)
    assert calls == [1, 1] and b["speech"] == fresh["speech"] != a["speech"]
