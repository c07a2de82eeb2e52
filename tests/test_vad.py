"""VAD: every true speech turn found with boundaries within 0.3 s, and the span logic itself."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import manifests
from pipeline.config import parse_config
from pipeline.runner import run_pipeline
from pipeline.backends.vad.silero import SileroVad
from pipeline.stages.vad import VadConfig, speech_spans
from tools import synth

HOP = SileroVad.hop


def _probs(spans: list[tuple[float, float]], duration: float, level: float = 0.9) -> np.ndarray:
    p = np.full(int(np.ceil(duration / HOP)), 0.02, np.float32)
    for a, b in spans:
        p[int(a / HOP): int(b / HOP)] = level
    return p


def test_hysteresis_padding_and_min_durations():
    cfg = VadConfig(min_silence_duration=0.2, min_speech_duration=0.25, speech_pad=0.05)
    prob = _probs([(1.0, 2.0), (2.1, 3.0), (5.0, 5.1), (6.0, 8.0)], 10.0)
    spans = speech_spans(prob, 10.0, cfg, HOP)
    # A 0.1 s dip does not end speech; a 0.1 s blip is not speech; pads stay inside the file.
    assert len(spans) == 2
    assert spans[0][0] == pytest.approx(1.0 - 0.05, abs=HOP) and spans[0][1] == pytest.approx(3.0 + 0.05, abs=HOP)
    assert spans[1][0] == pytest.approx(6.0 - 0.05, abs=HOP) and spans[1][1] == pytest.approx(8.0 + 0.05, abs=HOP)
    # Probabilities between the two thresholds keep speech going but never start it.
    mid = _probs([(1.0, 2.0)], 6.0)
    mid[int(2.0 / HOP): int(4.0 / HOP)] = 0.42
    assert speech_spans(mid, 6.0, cfg, HOP)[0][1] == pytest.approx(4.05, abs=HOP)
    assert speech_spans(np.full(100, 0.42, np.float32), 100 * HOP, cfg, HOP) == []


def test_long_speech_is_split_at_its_deepest_pause():
    cfg = VadConfig(max_speech_duration=10.0, speech_pad=0.0)
    prob = _probs([(0.0, 25.0)], 25.0)
    prob[int(7.0 / HOP)] = 0.3  # a shallow dip inside the cut window
    spans = speech_spans(prob, 25.0, cfg, HOP)
    assert all(b - a <= 10.0 + 1e-6 for a, b in spans)
    assert spans[0][1] == pytest.approx(7.0, abs=HOP)
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(25.0, abs=HOP)


def test_vad_finds_every_turn_of_generated_dialogues(tmp_path, ray_local):
    src = tmp_path / "in"
    truths = {}
    clips = [
        synth.synth_dialogue(11, n_turns=6, pause=(0.4, 1.0)),
        synth.synth_dialogue(12, n_turns=6, pause=(0.5, 1.2), noise_snr_db=20.0),
        synth.synth_monologue(13, n_sentences=4),
    ]
    for i, clip in enumerate(clips):
        audio, _ = synth.write_clip(clip, src / f"c{i}.wav", tmp_path / "truth" / f"c{i}.json")
        truths[audio.name] = clip.truth
    cfg = parse_config({"run": {"output": str(tmp_path / "out"), "progress": False, "report": {"enabled": False}},
                        "stages": {"ingest": {}, "vad": {}}})
    res = run_pipeline(cfg, src)
    ledger = {r["source_path"].rsplit("/", 1)[1]: r for r in manifests.read_manifest(res.output, "ledger").to_pylist()}
    vad = {r["recording_id"]: r for r in manifests.read_manifest(res.output, "vad").to_pylist()}
    for name, truth in truths.items():
        spans = [(s["start"], s["end"]) for s in vad[ledger[name]["recording_id"]]["speech"]]
        # Turns that touch (an overlap or no pause) are one stretch of speech for a VAD.
        stretches: list[list[float]] = []
        for t in sorted(truth.turns, key=lambda t: t.start):
            if stretches and t.start <= stretches[-1][1] + 0.15:
                stretches[-1][1] = max(stretches[-1][1], t.end)
            else:
                stretches.append([t.start, t.end])
        for a, b in stretches:
            inside = [s for s in spans if s[1] > a and s[0] < b]
            assert inside, f"{name}: speech {a:.2f}-{b:.2f} not detected"
            assert abs(min(s[0] for s in inside) - a) <= 0.3, (name, a, inside)
            assert abs(max(s[1] for s in inside) - b) <= 0.3, (name, b, inside)
        # No speech invented far from the truth.
        for s in spans:
            assert any(s[1] > a - 0.3 and s[0] < b + 0.3 for a, b in stretches), (name, s)
