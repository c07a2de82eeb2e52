"""DNSMOS P.835 (SIG/BAK/OVRL, optionally P.808) for clips and spans of 16 kHz audio.

Scores match `speechmos.dnsmos.run` / the official `dnsmos_local.py` window for window, with the
ONNX model that ships inside the `speechmos` package. The official recipe per clip:

* clips shorter than 9.01 s are doubled (appended to themselves) until they reach 9.01 s;
* window k covers samples [int(k * 16000), int((k + 9.01) * 16000)) for
  k < int(floor(len / 16000) - 9.01) + 1, and a window whose slice is shorter than
  int(9.01 * 16000) samples is skipped. The float rounding of `(k + 9.01) * 16000` makes this
  drop windows 7..23 and 119..122 (none else below 4000 s); we reproduce it so that scores stay
  comparable to published DNSMOS figures;
* each window's raw (sig, bak, ovrl) goes through the non-personalised polynomials, the clip
  score is the mean over windows. No input normalisation: audio must already lie in [-1, 1].

Speed: the network is a log-power STFT (160-sample hop, 900 frames per window) followed by four
full-resolution 3x3 convolutions (~96 % of the compute), then pooling layers and a small head.
Windows hop by 100 frames, so consecutive windows share most of their frames. We cut the graph
after the first max-pool: the front part runs once over each stretch of frames that windows
cover, and each window takes its slice of that. Only the 4 frames next to a window edge see the
window's zero padding (4 stacked 3x3 convs), so they are recomputed from 8-frame strips at each
edge. The head then runs per window, all windows of all clips batched together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DNSMOS", "SR", "window_starts", "tile_to_window"]

SR = 16000
INPUT_LENGTH = 9.01  # seconds, as in dnsmos_local.py
WIN_SAMPLES = int(INPUT_LENGTH * SR)  # 144160
HOP = 160  # STFT hop of the model (samples)
FRAME = 320  # STFT frame (samples)
WIN_FRAMES = 900  # frames per window: 144160 = 899 * 160 + 320
HALO = 4  # four 3x3 convolutions before the cut: edge effects reach 4 frames in
STRIP = 2 * HALO  # frames of an edge strip: its 4 outer outputs are exact
FRONT_OUT = "mos_estimator_logpow/conv2d_3/Relu:0_pooling0"  # [N, 32, T/2, 80]
FRONT_IN = "mos_estimator_logpow/concat:0"  # [N, T, 320]: framed audio
FRONT_MAX_FRAMES = 3600  # frames per front-end call; ~170 KB of activations per frame
GROUP_BATCHES = 4  # windows are scored in groups of about 4 head batches (memory bound)

# Non-personalised P.835 polynomials of dnsmos_local.py (highest power first).
POLY_SIG = (-0.08397278, 1.22083953, 0.0052439)
POLY_BAK = (-0.13166888, 1.60915514, -0.39604546)
POLY_OVRL = (-0.06766283, 1.11546468, 0.04602535)


def model_dir() -> Path:
    """The folder of the DNSMOS models bundled with the `speechmos` package."""
    try:
        root = resources.files("speechmos")
    except ModuleNotFoundError as e:
        raise ImportError("DNSMOS needs the `speechmos` package (it ships the ONNX models): "
                          "pip install speechmos") from e
    path = Path(str(root)) / "dnsmos_models"
    if not (path / "sig_bak_ovr.onnx").is_file():
        raise FileNotFoundError(f"{path / 'sig_bak_ovr.onnx'} is missing: reinstall speechmos")
    return path


def tile_to_window(audio: np.ndarray) -> np.ndarray:
    """Doubles a clip until it holds a whole window, as dnsmos_local.py does.

    Doubling (not repeating up to the window length) matters: an 8 s clip becomes 16 s and
    yields 7 windows, not 1.
    """
    reps = 1
    while len(audio) * reps < WIN_SAMPLES:
        reps *= 2
    return np.tile(audio, reps) if reps > 1 else audio


def window_starts(num_samples: int) -> list[int]:
    """Start samples of the windows dnsmos_local.py scores on a (tiled) clip of this length."""
    num_hops = int(np.floor(num_samples / SR) - INPUT_LENGTH) + 1
    starts = []
    for idx in range(num_hops):
        # The official slice bounds, float rounding included (see the module docstring).
        start, end = int(idx * SR), int((idx + INPUT_LENGTH) * SR)
        if min(end, num_samples) - start >= WIN_SAMPLES:
            starts.append(start)
    return starts


def _frames(audio: np.ndarray, first: int, last: int) -> np.ndarray:
    """Model frames first..last-1 (frame t = samples [160 t, 160 t + 320)) as [T, 320]."""
    seg = audio[first * HOP: last * HOP + FRAME - HOP]
    return np.lib.stride_tricks.sliding_window_view(seg, FRAME)[::HOP]


def _poly(coeffs, x):
    a, b, c = coeffs
    return (a * x + b) * x + c


@dataclass
class _Run:
    """A stretch of frames [first, last) of one clip that one or more windows cover."""
    clip: int
    first: int
    last: int
    pooled: np.ndarray | None = None  # [32, (last - first) / 2, 80]


class DNSMOS:
    """DNSMOS P.835 scorer (OVRL, SIG, BAK; P.808 too with `p808=True`).

    num_threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    providers: onnxruntime execution providers, e.g. ["CUDAExecutionProvider",
    "CPUExecutionProvider"]; default CPU.
    batch_size: windows per call of the network head (and of the P.808 model); the shared
    front part runs on up to FRONT_MAX_FRAMES frames per call.
    """

    def __init__(self, p808: bool = False, num_threads: int | None = None,
                 providers: list | None = None, batch_size: int = 16):
        import onnxruntime as ort

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.p808 = p808
        self.batch_size = batch_size
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads or 0
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # the cut graphs carry unused-initializer warnings
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        front, head = _split_model(model_dir() / "sig_bak_ovr.onnx")
        self._front = ort.InferenceSession(front, opts, providers=providers)
        self._head = ort.InferenceSession(head, opts, providers=providers)
        self._p808 = (ort.InferenceSession(str(model_dir() / "model_v8.onnx"), opts,
                                           providers=providers) if p808 else None)

    # -- public API ---------------------------------------------------------------------------

    def score(self, audio: np.ndarray, sample_rate: int = SR) -> dict:
        """Scores one clip: dict(ovrl, sig, bak[, p808])."""
        return self.score_batch([audio], sample_rate)[0]

    def score_batch(self, clips: list[np.ndarray], sample_rate: int = SR) -> list[dict]:
        """Scores many clips; the windows of all clips share the network calls."""
        clips = [self._prepare(c, sample_rate, f"clip {i}") for i, c in enumerate(clips)]
        return self._score_prepared(clips)

    def score_spans(self, audio: np.ndarray, spans: list[tuple[float, float]],
                    sample_rate: int = SR) -> list[dict]:
        """Scores spans (start_s, end_s) of one recording, each as its own clip."""
        audio = self._prepare(audio, sample_rate, "audio")
        n = len(audio)
        clips = []
        for i, span in enumerate(spans):
            try:
                start, end = (float(v) for v in span)
            except (TypeError, ValueError) as e:
                raise ValueError(f"span {i} must be (start_s, end_s), got {span!r}") from e
            a, b = round(start * SR), round(end * SR)
            if not (0 <= a < b <= n):
                raise ValueError(f"span {i} ({start:.3f}, {end:.3f}) s is empty or outside "
                                 f"the audio (0, {n / SR:.3f}) s")
            clips.append(audio[a:b])
        return self._score_prepared(clips)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _prepare(audio, sample_rate: int, what: str) -> np.ndarray:
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"DNSMOS: {what} must be a 1-D mono array, got shape {audio.shape}")
        if audio.size == 0:
            raise ValueError(f"DNSMOS: {what} is empty")
        if not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"DNSMOS: {what} has dtype {audio.dtype}; pass float audio in "
                             f"[-1, 1] (int16 PCM: divide by 32768)")
        if not np.isfinite(audio).all():
            raise ValueError(f"DNSMOS: {what} contains NaN or inf")
        peak = float(np.abs(audio).max())
        if peak > 1.0:
            raise ValueError(f"DNSMOS: {what} peaks at {peak:.3f}; values must lie in [-1, 1]")
        if sample_rate <= 0:
            raise ValueError(f"DNSMOS: sample_rate must be positive, got {sample_rate}")
        audio = audio.astype(np.float32, copy=False)
        if sample_rate != SR:
            import soxr

            # Resampling overshoots a little around a full-scale peak.
            audio = np.clip(soxr.resample(audio, sample_rate, SR), -1.0, 1.0)
            if audio.size == 0:
                raise ValueError(f"DNSMOS: {what} is shorter than one sample at {SR} Hz")
        return audio

    def _score_prepared(self, clips: list[np.ndarray]) -> list[dict]:
        clips = [tile_to_window(c) for c in clips]
        windows = [(c, s // HOP) for c, clip in enumerate(clips) for s in window_starts(len(clip))]
        raw = np.empty((len(windows), 4), np.float64)  # sig, bak, ovrl, p808 per window
        # Groups of about GROUP_BATCHES head batches, cut between clips where possible, bound
        # the pooled features held at once (<= 4.6 MB per window) even for hour-long clips.
        limit, g0 = GROUP_BATCHES * self.batch_size, 0
        for w in range(1, len(windows) + 1):
            size = w - g0
            if w == len(windows) or size >= 2 * limit or \
                    (size >= limit and windows[w][0] != windows[w - 1][0]):
                raw[g0:w] = self._score_windows(clips, windows[g0:w])
                g0 = w
        out = []
        bounds = np.searchsorted([c for c, _ in windows], np.arange(len(clips) + 1))
        for c in range(len(clips)):
            sig, bak, ovr, p808 = raw[bounds[c]: bounds[c + 1]].T
            d = {"ovrl": float(np.mean(_poly(POLY_OVRL, ovr))),
                 "sig": float(np.mean(_poly(POLY_SIG, sig))),
                 "bak": float(np.mean(_poly(POLY_BAK, bak)))}
            if self._p808 is not None:
                d["p808"] = float(np.mean(p808))
            out.append(d)
        return out

    def _score_windows(self, clips, windows: list[tuple[int, int]]) -> np.ndarray:
        """Raw (sig, bak, ovrl, p808 or nan) of windows given as (clip, first frame)."""
        runs, run_of = _runs(windows)
        self._run_front(clips, runs)
        left, right = self._edge_strips(clips, windows)
        raw = np.full((len(windows), 4), np.nan)
        for b0 in range(0, len(windows), self.batch_size):
            batch = []
            for w in range(b0, min(b0 + self.batch_size, len(windows))):
                f, r = windows[w][1], runs[run_of[w]]
                p0 = (f - r.first) // 2
                x = r.pooled[:, p0: p0 + WIN_FRAMES // 2].copy()
                x[:, :HALO // 2] = left[w]
                x[:, -(HALO // 2):] = right[w]
                batch.append(x)
            raw[b0: b0 + len(batch), :3] = self._head.run(None, {FRONT_OUT: np.stack(batch)})[0]
        if self._p808 is not None:
            raw[:, 3] = self._run_p808(clips, windows)
        return raw

    def _run_front(self, clips, runs: list[_Run]) -> None:
        """Pooled front-end features of every run, computed in chunks with a 4-frame halo."""
        jobs = []  # (run, out_first, out_last, in_first, in_last)
        for r in runs:
            n = r.last - r.first
            pieces = math.ceil(n / FRONT_MAX_FRAMES)
            size = 2 * math.ceil(n / pieces / 2)  # even: the 2x2 pool stays on the run's grid
            for a in range(r.first, r.last, size):
                b = min(a + size, r.last)
                jobs.append((r, a, b, max(a - HALO, r.first), min(b + HALO, r.last)))
        # Equal-length chunks share a call: runs of one window each (short clips) batch well.
        jobs.sort(key=lambda j: j[4] - j[3])
        outputs = {}
        i = 0
        while i < len(jobs):
            length = jobs[i][4] - jobs[i][3]
            k = i + 1
            while (k < len(jobs) and jobs[k][4] - jobs[k][3] == length
                   and (k - i + 1) * length <= FRONT_MAX_FRAMES + 2 * HALO):
                k += 1
            x = np.stack([_frames(clips[j[0].clip], j[3], j[4]) for j in jobs[i:k]])
            y = self._front.run(None, {FRONT_IN: x.astype(np.float32, copy=False)})[0]
            for j, yj in zip(jobs[i:k], y):
                r, a, b, ia, _ = j
                outputs.setdefault(id(r), []).append((a, yj[:, (a - ia) // 2: (b - ia) // 2]))
            i = k
        for r in runs:
            parts = sorted(outputs[id(r)], key=lambda p: p[0])
            r.pooled = np.concatenate([p for _, p in parts], axis=1)

    def _edge_strips(self, clips, windows):
        """Exact pooled features of each window's first and last 4 frames (zero-padded edges)."""
        strips = []
        for c, f in windows:
            strips.append(_frames(clips[c], f, f + STRIP))
            strips.append(_frames(clips[c], f + WIN_FRAMES - STRIP, f + WIN_FRAMES))
        step = max(1, FRONT_MAX_FRAMES // STRIP)
        ys = [self._front.run(None, {FRONT_IN: np.stack(strips[i: i + step])})[0]
              for i in range(0, len(strips), step)]
        y = np.concatenate(ys)  # [2 W, 32, 4, 80]
        return y[0::2, :, :HALO // 2], y[1::2, :, -(HALO // 2):]

    def _run_p808(self, clips, windows) -> np.ndarray:
        import librosa

        scores = np.empty(len(windows), np.float64)
        for b0 in range(0, len(windows), self.batch_size):
            segs = np.stack([clips[c][f * HOP: f * HOP + WIN_SAMPLES - HOP]
                             for c, f in windows[b0: b0 + self.batch_size]])
            mel = librosa.feature.melspectrogram(y=segs, sr=SR, n_fft=FRAME + 1, hop_length=HOP,
                                                 n_mels=120)
            # ref=np.max is per window in dnsmos_local.py: convert window by window.
            feats = np.stack([((librosa.power_to_db(m, ref=np.max) + 40) / 40).T for m in mel])
            scores[b0: b0 + len(segs)] = self._p808.run(
                None, {"input_1": feats.astype(np.float32)})[0][:, 0]
        return scores


def _runs(windows: list[tuple[int, int]]) -> tuple[list[_Run], list[int]]:
    """Merges the frame ranges of overlapping windows of the same clip; returns the runs and
    the run of each window."""
    runs: list[_Run] = []
    run_of = []
    for c, f in windows:  # in clip order, then start order
        if runs and runs[-1].clip == c and f <= runs[-1].last:
            runs[-1].last = max(runs[-1].last, f + WIN_FRAMES)
        else:
            runs.append(_Run(c, f, f + WIN_FRAMES))
        run_of.append(len(runs) - 1)
    return runs, run_of


def _split_model(path: Path) -> tuple[bytes, bytes]:
    """Cuts the P.835 graph after the first max-pool into a front part with a free number of
    frames and a head, both as serialized ONNX models."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as e:
        raise ImportError("DNSMOS needs the `onnx` package to split the model graph: "
                          "pip install onnx") from e

    model = onnx.load(str(path))
    graph = model.graph
    nodes = list(graph.node)
    cut = next(i for i, n in enumerate(nodes) if FRONT_OUT in n.output)
    start = next(i for i, n in enumerate(nodes) if FRONT_IN in n.output) + 1
    inits = {t.name: t for t in graph.initializer}

    def build(part, inp, out, in_shape, out_shape, name):
        used = {x for n in part for x in n.input}
        g = helper.make_graph(
            part, name,
            [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            [inits[x] for x in sorted(used) if x in inits])
        m = helper.make_model(g, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        onnx.checker.check_model(m)
        return m.SerializeToString()

    front = build(nodes[start: cut + 1], FRONT_IN, FRONT_OUT, ["N", "T", FRAME],
                  ["N", 32, "P", 80], "dnsmos_front")
    head = build(nodes[cut + 1:], FRONT_OUT, graph.output[0].name, ["N", 32, WIN_FRAMES // 2, 80],
                 ["N", 3], "dnsmos_head")
    return front, head
