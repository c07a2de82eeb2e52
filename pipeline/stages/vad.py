"""VAD: speech spans per recording, from a VAD backend's window probabilities (default: silero-vad,
``pipeline/backends/vad/silero.py``).

The probabilities are stored (``pipeline/scores.py``) apart from the thresholds that turn them
into spans: a threshold change re-derives the spans without running the model.
"""

from __future__ import annotations

import base64
import os

import numpy as np
from pydantic import Field, model_validator

from pipeline.backends import BackendSections
from pipeline.backends.vad import BACKENDS
from pipeline.scores import ScoreStore, key_of, scoring_fingerprint
from pipeline.stage import Resources, Stage, StageConfig


class VadConfig(StageConfig, BackendSections):
    registry = BACKENDS

    backend: str = "silero"
    threshold: float = Field(0.5, gt=0, lt=1, description="speech probability that starts speech")
    neg_threshold: float | None = Field(None, gt=0, lt=1, description="probability under which speech may end (default threshold - 0.15)")
    min_speech_duration: float = Field(0.25, ge=0, description="seconds; shorter speech is dropped")
    min_silence_duration: float = Field(0.1, ge=0, description="seconds of silence that end a speech span")
    speech_pad: float = Field(0.03, ge=0, description="seconds added on each side of a span")
    max_speech_duration: float | None = Field(None, gt=0, description="seconds; longer spans are split at their deepest pause")
    min_total_speech: float = Field(1.0, ge=0, description="seconds; recordings with less speech are rejected")

    @model_validator(mode="after")
    def _neg(self) -> "VadConfig":
        if self.neg_threshold is not None and self.neg_threshold > self.threshold:
            raise ValueError("neg_threshold must not exceed threshold")
        return self


def speech_spans(prob: np.ndarray, duration: float, cfg: VadConfig, hop: float) -> list[tuple[float, float]]:
    """Hysteresis on window probabilities (one per ``hop`` seconds) -> padded speech spans in seconds."""
    on, off = cfg.threshold, cfg.neg_threshold if cfg.neg_threshold is not None else max(0.01, cfg.threshold - 0.15)
    spans: list[list[float]] = []
    start = None
    silence_from = None
    for i, p in enumerate(prob):
        t = i * hop
        if start is None:
            if p >= on:
                start, silence_from = t, None
            continue
        if p >= on:
            silence_from = None
        elif p < off:
            if silence_from is None:
                silence_from = t
            if t + hop - silence_from >= cfg.min_silence_duration:
                spans.append([start, silence_from])
                start, silence_from = None, None
    if start is not None:
        spans.append([start, silence_from if silence_from is not None else len(prob) * hop])
    spans = [s for s in spans if s[1] - s[0] >= cfg.min_speech_duration]
    if cfg.max_speech_duration:
        spans = [piece for s in spans for piece in _split_long(s, prob, hop, cfg.max_speech_duration)]
    # Pad, but never across half of the gap to the neighbour.
    pad = cfg.speech_pad
    out = []
    for i, (a, b) in enumerate(spans):
        lo = 0.0 if i == 0 else (spans[i - 1][1] + a) / 2
        hi = duration if i == len(spans) - 1 else (b + spans[i + 1][0]) / 2
        out.append((round(max(lo, a - pad, 0.0), 3), round(min(hi, b + pad, duration), 3)))
    return out


def _split_long(span: list[float], prob: np.ndarray, hop: float, limit: float) -> list[list[float]]:
    a, b = span
    if b - a <= limit:
        return [span]
    i0, i1 = int(a / hop), int(b / hop)
    # Cut at the least speech-like window in the middle half of the part that must be cut.
    lo = i0 + int((limit * 0.5) / hop)
    hi = min(i1 - 1, i0 + int(limit / hop))
    cut = lo + int(np.argmin(prob[lo:hi])) if hi > lo else i0 + int(limit / hop)
    t = cut * hop
    return [[a, t]] + _split_long([t, b], prob, hop, limit)


class VadStage(Stage):
    Config = VadConfig
    manifest = "vad"
    version = "1"
    default_resources = Resources(num_cpus=1, batch_size=8, concurrency=1)
    needs = ("audio_path", "duration")
    adds = ("speech", "speech_duration", "num_segments")
    thresholds = ("threshold", "neg_threshold", "min_speech_duration", "min_silence_duration", "speech_pad",
                  "max_speech_duration", "min_total_speech")

    def setup(self):
        self._model = None  # loaded for the first recording without stored probabilities
        self.store = ScoreStore(self.ctx.output_dir, self.ctx.name, scoring_fingerprint(type(self), self.config))

    @property
    def model(self):
        if self._model is None:
            self._model = self.config.build_backend(self.config.backend, self.ctx.device, self.ctx.num_threads)
        return self._model

    def _probabilities(self, rows) -> list[tuple[np.ndarray, float]]:
        """(window probabilities, seconds per window) of each recording, stored ones first. The
        analysis copy's size and mtime name the audio (it is rewritten when its source changes)."""
        keys = [key_of("vad", os.stat(r["audio_path"]).st_size, os.stat(r["audio_path"]).st_mtime_ns) for r in rows]
        stored = self.store.get(keys)
        missing = [i for i, k in enumerate(keys) if k not in stored]
        if missing:
            probs = self.model.probabilities([rows[i]["audio_path"] for i in missing])
            new = {keys[i]: {"hop": self.model.hop,
                             "prob": base64.b64encode(np.asarray(p, "<f4").tobytes()).decode("ascii")}
                   for i, p in zip(missing, probs)}
            self.store.put(new)
            stored.update(new)
        return [(np.frombuffer(base64.b64decode(stored[k]["prob"]), "<f4").copy(), stored[k]["hop"]) for k in keys]

    def process(self, rows):
        probs = self._probabilities(rows)
        out = []
        for row, (prob, hop) in zip(rows, probs):
            spans = speech_spans(prob, row["duration"], self.config, hop)
            total = round(sum(b - a for a, b in spans), 3)
            r = dict(row, speech=[{"start": a, "end": b} for a, b in spans], speech_duration=total,
                     num_segments=len(spans), status="ok", reason=None)
            if total < self.config.min_total_speech:
                r["status"], r["reason"] = "rejected", f"no_speech: {total:.2f} s of speech < min_total_speech {self.config.min_total_speech} s"
            out.append(r)
        return out
