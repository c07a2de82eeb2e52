"""Offline diarization from VAD spans and resemblyzer speaker embeddings.

1. Speech spans (from VAD) are cut into short overlapping windows (default 1.5 s, hop 0.75 s;
   a shorter span is one window) and each window gets a GE2E speaker embedding from
   resemblyzer's `VoiceEncoder`, whose weights ship in the pip package.
2. The windows are clustered by spectral clustering whose number of speakers is the largest
   eigengap (NME-SC), bounded by min/max speakers; K = 1 is a possible answer. Speakers whose
   centroids are closer than ``threshold`` (cosine similarity) are then merged: the 1-vs-2 check
   that keeps a monologue one speaker.
3. Turns are rebuilt frame by frame (10 ms): each frame goes to the speaker whose centroid the
   windows covering it resemble most on average; speaker changes shorter than ``min_turn``
   inside a speech span are smoothed away, and same-speaker turns at most ``merge_gap`` apart
   are joined.

One speaker per window: overlapped speech goes to one of the speakers, so this backend reports
no overlaps (its exclusive turns are its turns). Back-channels inside another speaker's turn are
mostly absorbed by that turn.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from threadpoolctl import threadpool_limits

from pipeline.audio import read_span
from pipeline.backends.diarization import Diarization, Turn, merge_turns

SR = 16000
FRAME = 0.01  # resemblyzer's mel hop (10 ms); also the resolution of the output turns
N_FFT = 400  # 25 ms mel window
TARGET_DBFS = -30.0  # resemblyzer normalises its training utterances to this level
MAX_SPEAKERS = 8  # when max_speakers is not set
MIN_SPECTRAL = 6  # fewer windows than this are clustered by merging alone
MAX_CLUSTERED = 800  # windows clustered at most (spread over the recording); the rest are assigned
P_CANDIDATES = 24  # neighbourhood sizes tried by NME-SC


class EmbeddedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: float = Field(1.5, ge=0.5, le=6.0, description="seconds of speech behind one speaker embedding")
    hop: float = Field(0.75, gt=0, description="seconds between window starts (at most window)")
    threshold: float = Field(0.88, gt=0, le=1, description="speakers whose centroids have a higher cosine similarity are merged (lower finds fewer speakers; 1 never merges)")
    min_turn: float = Field(0.5, ge=0, description="seconds; a shorter speaker change inside one speech span is smoothed away")
    merge_gap: float = Field(0.3, ge=0, description="seconds; same-speaker turns at most this far apart are joined")
    batch_size: int = Field(64, ge=1, description="windows per encoder call")

    @model_validator(mode="after")
    def _hop(self) -> "EmbeddedSettings":
        if self.hop > self.window:
            raise ValueError(f"hop ({self.hop}) must not exceed window ({self.window})")
        return self


def _hz_to_mel(f):
    # Slaney's mel scale (librosa's default): linear to 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), f / (200.0 / 3))


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filters(sr: int = SR, n_fft: int = N_FFT, n_mels: int = 40) -> np.ndarray:
    """Slaney-normalised triangular filters, equal to librosa.filters.mel's (built here because
    librosa's first call compiles numba code for ~10 s in every fresh worker)."""
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    lower = (freqs[None] - pts[:-2, None]) / np.diff(pts)[:-1, None]
    upper = (pts[2:, None] - freqs[None]) / np.diff(pts)[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return (w * (2.0 / (pts[2:] - pts[:-2]))[:, None]).astype(np.float32)


class EmbeddedDiarizer:
    def __init__(self, settings: EmbeddedSettings | None = None, device: str = "cpu", num_threads: int = 1):
        import torch
        from resemblyzer import VoiceEncoder

        self.s = settings or EmbeddedSettings()
        self.num_threads = num_threads
        self.torch = torch
        self.device = device
        self.encoder = VoiceEncoder(device, verbose=False)
        self.encoder.eval()
        self.mel_fb = torch.from_numpy(mel_filters()).to(device)
        self.hann = torch.hann_window(N_FFT, device=device)

    # ------------------------------------------------------------------ embeddings
    def _mel(self, wav: np.ndarray):
        """(frames, 40) mel power, frame i centred at i * 10 ms (resemblyzer's features)."""
        x = self.torch.from_numpy(wav).to(self.device)
        spec = self.torch.stft(x, N_FFT, int(SR * FRAME), N_FFT, self.hann, center=True, pad_mode="constant",
                               return_complex=True).abs() ** 2
        return (self.mel_fb @ spec).T

    def _windows(self, n: int) -> list[tuple[int, int]]:
        size, hop = round(self.s.window / FRAME), max(1, round(self.s.hop / FRAME))
        if n <= size:
            return [(0, n)]
        starts = list(range(0, n - size + 1, hop))
        if starts[-1] + size < n:  # the tail gets its own window
            starts.append(n - size)
        return [(a, a + size) for a in starts]

    def embed(self, audio_path: str, spans: list[tuple[float, float]]):
        """Embeddings (N, 256) of every window, and per window (span index, first frame, end frame).

        Spans are read one at a time and full-size windows are embedded as soon as a batch is
        complete, so memory stays bounded on long recordings."""
        index: list[tuple[int, int, int]] = []
        out: list[tuple[int, np.ndarray]] = []  # (first window index, embeddings)
        pending: list[tuple[int, object]] = []  # full-size windows waiting for a batch
        size = round(self.s.window / FRAME)
        hop_samples = int(SR * FRAME)
        for si, (a, b) in enumerate(spans):
            wav, sr = read_span(audio_path, a, b)
            if sr != SR:
                raise ValueError(f"{audio_path}: diarization needs the 16 kHz analysis copy (got {sr} Hz)")
            if len(wav) < N_FFT:
                continue
            mel = self._mel(wav)
            for f0, f1 in self._windows(len(mel)):
                seg = wav[f0 * hop_samples:f1 * hop_samples]
                # Same loudness for every window: the encoder's input is linear mel power.
                power = float(np.mean(seg.astype(np.float64) ** 2)) if len(seg) else 0.0
                window = mel[f0:f1] * (10 ** (TARGET_DBFS / 10) / max(power, 1e-10))
                index.append((si, f0, f1))
                if f1 - f0 == size:
                    pending.append((len(index) - 1, window))
                    if len(pending) >= self.s.batch_size:
                        out += self._encode(pending)
                        pending = []
                else:  # a span shorter than one window: embedded on its own
                    out += self._encode([(len(index) - 1, window)])
        out += self._encode(pending)
        emb = np.zeros((len(index), 256), np.float32)
        for i, e in out:
            emb[i] = e
        return emb, index

    def _encode(self, items: list[tuple[int, object]]) -> list[tuple[int, np.ndarray]]:
        if not items:
            return []
        with self.torch.no_grad():
            e = self.encoder(self.torch.stack([w for _, w in items])).cpu().numpy()
        return [(i, e[k]) for k, (i, _) in enumerate(items)]

    # ------------------------------------------------------------------ clustering
    def cluster(self, emb: np.ndarray, weights: np.ndarray, min_speakers: int,
                max_speakers: int | None) -> np.ndarray:
        """Unit-norm speaker centroids (K, 256) from window embeddings (unit vectors).

        Windows shorter than half the window size (weight < 0.5) give noisy embeddings: they
        are left out unless nothing else is there. Long recordings are clustered on an evenly
        spread subset of windows (the eigen-decomposition is cubic in their number)."""
        reliable = np.flatnonzero(weights >= 0.5)
        if len(reliable) < 2:
            reliable = np.arange(len(emb))
        if len(reliable) > MAX_CLUSTERED:
            reliable = reliable[np.linspace(0, len(reliable) - 1, MAX_CLUSTERED).round().astype(int)]
        x = emb[reliable].astype(np.float64)
        hi = max(1, min(max_speakers or MAX_SPEAKERS, len(x)))
        lo = max(1, min(min_speakers, hi))
        # OpenBLAS reads its thread count once at import, before the runner limits threads:
        # limit it here, as oversubscribed BLAS threads make the eigensolver 20x slower.
        with threadpool_limits(self.num_threads):
            if len(x) >= MIN_SPECTRAL:
                labels = spectral_clusters(x, lo, hi)
            else:  # too few windows for a graph: every window starts as its own speaker
                labels = np.arange(len(x))
            return merge_close(x, labels, self.s.threshold, lo)

    # ------------------------------------------------------------------ turns
    def diarize(self, audio_path: str, speech: list[tuple[float, float]], duration: float,
                min_speakers: int = 1, max_speakers: int | None = None) -> Diarization:
        spans = sorted((max(0.0, a), min(duration, b)) for a, b in speech if min(duration, b) > max(0.0, a))
        emb, index = self.embed(audio_path, spans)
        if not index:
            return Diarization([])
        size = round(self.s.window / FRAME)
        weights = np.array([(f1 - f0) / size for _, f0, f1 in index])
        centroids = self.cluster(emb, weights, min_speakers, max_speakers)
        sim = emb @ centroids.T  # (windows, speakers)
        turns: list[Turn] = []
        by_span: dict[int, list[int]] = {}
        for w, (si, _, _) in enumerate(index):
            by_span.setdefault(si, []).append(w)
        for si, ws in by_span.items():
            a, b = spans[si]
            n = max(f1 for _, _, f1 in (index[w] for w in ws))
            score = np.zeros((n, len(centroids)))
            count = np.zeros(n)
            for w in ws:
                _, f0, f1 = index[w]
                score[f0:f1] += sim[w]
                count[f0:f1] += 1
            label = np.argmax(score / np.maximum(count, 1)[:, None], axis=1)
            runs = _smooth(_runs(label), round(self.s.min_turn / FRAME))
            for f0, f1, spk in runs:
                t0 = a + f0 * FRAME
                t1 = b if f1 >= n else min(b, a + f1 * FRAME)
                if t1 > t0:
                    turns.append((t0, t1, f"spk{spk}"))
        return Diarization(merge_turns(turns, self.s.merge_gap))


def spectral_clusters(x: np.ndarray, min_k: int, max_k: int) -> np.ndarray:
    """Cluster label per row of ``x`` (unit vectors) by spectral clustering whose number of
    clusters is the largest eigengap of the graph Laplacian, with the graph pruned to each
    window's p nearest neighbours and p chosen by the normalised maximum eigengap (NME-SC,
    Park et al. 2019): no distance threshold to tune, and K = 1 is one of the answers."""
    from scipy.linalg import eigh
    from sklearn.cluster import KMeans

    n = len(x)
    sim = np.clip(x @ x.T, 0.0, 1.0)
    order = np.argsort(-sim, axis=1)
    top_k = min(max_k, n - 1)

    def laplacian(p: int) -> np.ndarray:
        keep = np.zeros_like(sim)
        np.put_along_axis(keep, order[:, :p], 1.0, axis=1)
        a = sim * keep
        a = (a + a.T) / 2
        np.fill_diagonal(a, 0.0)
        return np.diag(a.sum(1)) - a

    best = None
    for p in np.unique(np.linspace(2, max(2, n // 2), min(P_CANDIDATES, max(1, n // 2 - 1))).astype(int)):
        lap = laplacian(p)
        ev = eigh(lap, eigvals_only=True, subset_by_index=[0, top_k])
        gaps = np.diff(ev)[min_k - 1:]
        if len(gaps) == 0:  # max_k == n: nothing to choose
            k, ratio = min_k, 0.0
        else:
            top = eigh(lap, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0]
            k = min_k + int(np.argmax(gaps))
            ratio = p / max(gaps.max() / max(top, 1e-10), 1e-10)
        if best is None or ratio < best[0]:
            best = (ratio, k, p)
    _, k, p = best
    if k == 1:
        return np.zeros(n, int)
    vec = eigh(laplacian(p), subset_by_index=[0, k - 1])[1]
    vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-10)
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(vec)


def _centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    c = np.stack([x[labels == k].mean(0) for k in np.unique(labels)])
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def merge_close(x: np.ndarray, labels: np.ndarray, threshold: float, min_k: int) -> np.ndarray:
    """Merge the two most similar speakers while their centroids' cosine similarity exceeds
    ``threshold`` (and more than ``min_k`` remain): the check that keeps one voice split in
    two (a monologue, a speaker whose tone changes) one speaker. Returns the centroids."""
    labels = np.unique(labels, return_inverse=True)[1]
    centroids = _centroids(x, labels)
    while len(centroids) > min_k:
        s = centroids @ centroids.T
        np.fill_diagonal(s, -1.0)
        i, j = np.unravel_index(np.argmax(s), s.shape)
        if s[i, j] <= threshold:
            break
        labels[labels == j] = i
        labels = np.unique(labels, return_inverse=True)[1]
        centroids = _centroids(x, labels)
    return centroids


def _runs(label: np.ndarray) -> list[list[int]]:
    """[first frame, end frame, label] of each run of equal labels."""
    cuts = np.flatnonzero(np.diff(label)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(label)]])
    return [[int(s), int(e), int(label[s])] for s, e in zip(starts, ends)]


def _smooth(runs: list[list[int]], min_frames: int) -> list[list[int]]:
    """Give runs shorter than ``min_frames`` to their longer neighbour, shortest first."""
    runs = [list(r) for r in runs]
    while len(runs) > 1:
        i = min(range(len(runs)), key=lambda j: runs[j][1] - runs[j][0])
        if runs[i][1] - runs[i][0] >= min_frames:
            break
        left = runs[i - 1] if i > 0 else None
        right = runs[i + 1] if i + 1 < len(runs) else None
        nb = max((r for r in (left, right) if r is not None), key=lambda r: r[1] - r[0])
        runs[i][2] = nb[2]
        merged: list[list[int]] = []
        for r in runs:
            if merged and merged[-1][2] == r[2]:
                merged[-1][1] = r[1]
            else:
                merged.append(r)
        runs = merged
    return runs
