"""VAD: speech spans per recording with silero-vad (the ONNX model that ships in the package).

The model is stepped over 32 ms windows of several recordings at once (one "lane" per recording,
each with its own recurrent state), streaming each file block by block: memory does not grow with
file length and the per-call overhead of the small model is shared by the lanes.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import Field, model_validator

from pipeline.stage import Resources, Stage, StageConfig

SR = 16000
WINDOW = 512  # samples per model step at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees


class VadConfig(StageConfig):
    backend: Literal["silero"] = "silero"
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


class SileroOnnx:
    """Batched streaming speech probabilities from silero's ONNX model."""

    def __init__(self, num_threads: int = 1, providers: list[str] | None = None):
        import onnxruntime as ort
        import silero_vad

        path = os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        self._sr = np.array(SR, dtype=np.int64)

    def probabilities(self, paths: list[str], block_seconds: float = 30.0) -> list[np.ndarray]:
        """Speech probability of every 32 ms window of each 16 kHz mono file."""
        n = len(paths)
        files = [sf.SoundFile(p) for p in paths]
        try:
            for f, p in zip(files, paths):
                if f.samplerate != SR or f.channels != 1:
                    raise ValueError(f"{p}: VAD needs 16 kHz mono audio (got {f.samplerate} Hz, {f.channels} ch)")
            probs: list[list[np.ndarray]] = [[] for _ in range(n)]
            state = np.zeros((2, n, 128), np.float32)
            context = np.zeros((n, CONTEXT), np.float32)
            block = int(block_seconds * SR) // WINDOW * WINDOW
            alive = np.ones(n, bool)
            while alive.any():
                blocks = []
                for i, f in enumerate(files):
                    data = f.read(block, dtype="float32") if alive[i] else np.zeros(0, np.float32)
                    if len(data) < block:
                        alive[i] = False
                    blocks.append(data)
                steps = max(-(-len(b) // WINDOW) for b in blocks)
                if steps == 0:
                    break
                x = np.zeros((n, steps * WINDOW), np.float32)
                for i, b in enumerate(blocks):
                    x[i, : len(b)] = b
                lens = np.array([-(-len(b) // WINDOW) for b in blocks])
                out = np.zeros((n, steps), np.float32)
                for s in range(steps):
                    # Lanes whose file has ended drop out instead of stepping over padding.
                    act = np.flatnonzero(lens > s)
                    full = len(act) == n
                    ctx = context if full else context[act]
                    st = state if full else state[:, act]
                    chunk = np.concatenate([ctx, x[act, s * WINDOW:(s + 1) * WINDOW]], axis=1)
                    p, st = self.session.run(None, {"input": chunk, "state": st, "sr": self._sr})
                    out[act, s] = p[:, 0]
                    if full:
                        state, context = st, chunk[:, -CONTEXT:]
                    else:
                        state[:, act], context[act] = st, chunk[:, -CONTEXT:]
                for i, b in enumerate(blocks):
                    probs[i].append(out[i, : -(-len(b) // WINDOW)])
            return [np.concatenate(p) if p else np.zeros(0, np.float32) for p in probs]
        finally:
            for f in files:
                f.close()


def speech_spans(prob: np.ndarray, duration: float, cfg: VadConfig) -> list[tuple[float, float]]:
    """Hysteresis on window probabilities -> padded speech spans in seconds."""
    hop = WINDOW / SR
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

    def __init__(self, config: VadConfig, ctx):
        super().__init__(config, ctx)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ctx.device == "cuda" else None
        self.model = SileroOnnx(ctx.num_threads, providers)

    def process(self, rows):
        probs = self.model.probabilities([r["audio_path"] for r in rows])
        out = []
        for row, prob in zip(rows, probs):
            spans = speech_spans(prob, row["duration"], self.config)
            total = round(sum(b - a for a, b in spans), 3)
            r = dict(row, speech=[{"start": a, "end": b} for a, b in spans], speech_duration=total,
                     num_segments=len(spans), status="ok", reason=None)
            if total < self.config.min_total_speech:
                r["status"], r["reason"] = "rejected", f"no_speech: {total:.2f} s of speech < min_total_speech {self.config.min_total_speech} s"
            out.append(r)
        return out
