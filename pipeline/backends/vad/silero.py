"""silero-vad: the ONNX model that ships in the pip package.

The model is stepped over 32 ms windows of several recordings at once (one "lane" per recording,
each with its own recurrent state), streaming each file block by block: memory does not grow with
file length and the per-call overhead of the small model is shared by the lanes.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
from pydantic import BaseModel, ConfigDict

from pipeline.audio import ANALYSIS_SR

WINDOW = 512  # samples per model step at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees


class SileroOptions(BaseModel):
    """silero has no options of its own (the stage's thresholds apply to every VAD backend)."""

    model_config = ConfigDict(extra="forbid")


class SileroVad:
    """Batched streaming speech probabilities from silero's ONNX model."""

    Options = SileroOptions
    hop = WINDOW / ANALYSIS_SR  # seconds per probability

    def __init__(self, options: SileroOptions | None = None, device: str = "cpu", num_threads: int = 1):
        import onnxruntime as ort
        import silero_vad

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
        path = os.path.join(os.path.dirname(silero_vad.__file__), "data", "silero_vad.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        self._sr = np.array(ANALYSIS_SR, dtype=np.int64)

    def probabilities(self, paths: list[str], block_seconds: float = 30.0) -> list[np.ndarray]:
        """Speech probability of every 32 ms window of each 16 kHz mono file."""
        n = len(paths)
        files = [sf.SoundFile(p) for p in paths]
        try:
            for f, p in zip(files, paths):
                if f.samplerate != ANALYSIS_SR or f.channels != 1:
                    raise ValueError(f"{p}: VAD needs 16 kHz mono audio (got {f.samplerate} Hz, {f.channels} ch)")
            probs: list[list[np.ndarray]] = [[] for _ in range(n)]
            state = np.zeros((2, n, 128), np.float32)
            context = np.zeros((n, CONTEXT), np.float32)
            block = int(block_seconds * ANALYSIS_SR) // WINDOW * WINDOW
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
