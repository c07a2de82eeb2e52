"""A new ASR backend is one class plus one registry entry (docs/CONTRIBUTING.md): this one is
defined here, registered at test time, and runs end to end in a real pipeline run (real Ray
workers, real Parquet), configured through its own section of stages.asr like the shipped ones."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from pipeline import manifests
from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr import BACKENDS
from pipeline.backends.asr.base import Transcript, as_float32
from pipeline.config import ConfigError, parse_config
from pipeline.runner import run_pipeline
from pipeline.stages.asr import AsrStage

ROOT = Path(__file__).resolve().parent.parent


class CountOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    word: str = Field("tick", description="the word said for every second of audio")


class CountBackend:
    """Says ``word`` once per started second of each item: what it heard is easy to check."""

    Options = CountOptions
    name = "count"
    max_seconds = 30.0
    can_identify_language = False
    word_timestamps = False

    def __init__(self, options: CountOptions | None = None, device: str = "cpu", num_threads: int = 1):
        self.options = options or CountOptions()

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        out = []
        for x in audios:
            n = int(np.ceil(len(as_float32(x)) / ANALYSIS_SR))
            out.append(Transcript(" ".join([self.options.word] * n), 0.9))
        return out

    def detect_language(self, audios):
        raise NotImplementedError


@pytest.fixture
def count_backend():
    import ray

    BACKENDS.register("count", CountBackend)
    # The Ray workers cannot import this test module: they get the class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    BACKENDS.unregister("count")


def test_a_backend_registered_at_run_time_runs_in_the_pipeline(ray_local, count_backend, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(ROOT / "examples" / "audio" / "dlg_clean_en.wav", src / "dlg.wav")
    raw = {"run": {"output": str(tmp_path / "out"), "progress": False, "report": {"enabled": False}},
           "stages": {"ingest": {}, "vad": {},
                      "asr": {"backends": {"default": "count"}, "count": {"word": "ping"}}}}
    # Its section is validated like a shipped backend's, and the stage knows its name.
    bad = {**raw, "stages": {**raw["stages"], "asr": {"backends": {"default": "count"}, "count": {"wrod": "x"}}}}
    with pytest.raises(ConfigError, match=r"stages\.asr\.count\.wrod: unknown key"):
        parse_config(bad)
    cfg = parse_config(raw)
    assert cfg.stages[-1].config.options("count").word == "ping"
    assert AsrStage.loads_model()  # a stage with a backend model runs as actors

    res = run_pipeline(cfg, src)
    (row,) = manifests.read_manifest(res.output, "asr").to_pylist()
    assert row["status"] == "ok", row["reason"]
    speech = manifests.read_manifest(res.output, "vad").to_pylist()[0]["speech"]
    # Without diarization, one utterance per VAD span, all of speaker SPEAKER_00; the text is the
    # backend's (one "ping" per started second of each span).
    assert len(row["utterances"]) == len(speech) > 1
    for u, s in zip(row["utterances"], speech):
        assert u["speaker"] == "SPEAKER_00" and (u["start"], u["end"]) == (s["start"], s["end"])
        words = u["text"].split()
        assert set(words) == {"ping"} and abs(len(words) - np.ceil(s["end"] - s["start"])) <= 1
        assert u["confidence"] == 0.9
    assert res.ledger.column("status").to_pylist() == ["kept"]
