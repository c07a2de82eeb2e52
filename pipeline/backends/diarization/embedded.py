"""Offline diarization from VAD spans and resemblyzer speaker embeddings.

1. Speech spans (from VAD) are cut into short overlapping windows (default 1.5 s, hop 0.75 s;
   a shorter span is one window) and each window gets a GE2E speaker embedding from
   resemblyzer's `VoiceEncoder`, whose weights ship in the pip package. Every window is brought
   to the same loudness first, so a quiet speaker is not a different speaker.
2. Speakers: average-linkage agglomerative clustering of the windows (cosine similarity), merged
   while the mean similarity between two groups is at least ``threshold``; the number of groups
   left is the number of speakers (K = 1 included), within min/max speakers. The threshold is
   a property of the embedding (same-voice vs different-voice similarity of resemblyzer
   windows), not of a recording, so it transfers across recordings. A group holding less than
   ``min_speaker`` seconds of windows is not counted as a speaker (overlapped speech, laughter
   and noise bursts form such groups on real recordings): it joins its nearest group.
3. Turns: each 10 ms frame scores every speaker by the mean similarity of the windows covering it
   to the speaker's centroid; inside each speech span a Viterbi search picks the speaker
   sequence with the highest total score minus ``change_penalty`` per change, and same-speaker
   turns at most ``merge_gap`` apart are joined.

One speaker per window: overlapped speech goes to one of the speakers, so this backend reports
no overlaps (its exclusive turns are its turns). A back-channel in its own VAD span gets its own
speaker decision; one inside another speaker's speech is mostly absorbed by that turn.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from threadpoolctl import threadpool_limits

from pipeline.audio import ANALYSIS_SR, read_span
from pipeline.backends.diarization.base import Diarization, TurnTuple, merge_turns

FRAME = 0.01  # resemblyzer's mel hop (10 ms); also the resolution of the output turns
N_FFT = 400  # 25 ms mel window
TARGET_DBFS = -30.0  # resemblyzer normalises its training utterances to this level
MAX_SPEAKERS = 8  # when max_speakers is not set
MAX_CLUSTERED = 800  # windows clustered at most (spread over the recording); the rest are assigned


class EmbeddedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: float = Field(1.5, ge=0.5, le=6.0, description="seconds of speech behind one speaker embedding")
    hop: float = Field(0.75, gt=0, description="seconds between window starts (at most window)")
    threshold: float = Field(0.7, gt=0, le=1, description="groups of windows whose mean cosine similarity is at least this are one speaker (lower finds fewer speakers)")
    min_speaker: float = Field(3.0, ge=0, description="seconds of clustered windows (count x hop) a speaker needs; smaller groups join the nearest speaker")
    change_penalty: float = Field(0.1, ge=0, description="similarity x seconds a speaker change inside one speech span must gain (higher: fewer, longer turns)")
    merge_gap: float = Field(0.3, ge=0, description="seconds; same-speaker turns at most this far apart are joined")
    batch_size: int = Field(64, ge=1, description="windows per encoder call")

    @model_validator(mode="after")
    def _hop(self) -> "EmbeddedOptions":
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


def mel_filters(sr: int = ANALYSIS_SR, n_fft: int = N_FFT, n_mels: int = 40) -> np.ndarray:
    """Slaney-normalised triangular filters, equal to librosa.filters.mel's (built here because
    librosa's first call compiles numba code for ~10 s in every fresh worker)."""
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    lower = (freqs[None] - pts[:-2, None]) / np.diff(pts)[:-1, None]
    upper = (pts[2:, None] - freqs[None]) / np.diff(pts)[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return (w * (2.0 / (pts[2:] - pts[:-2]))[:, None]).astype(np.float32)


class EmbeddedDiarizer:
    Options = EmbeddedOptions

    def __init__(self, options: EmbeddedOptions | None = None, device: str = "cpu", num_threads: int = 1):
        import torch
        from resemblyzer import VoiceEncoder

        self.s = options or EmbeddedOptions()
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
        spec = self.torch.stft(x, N_FFT, int(ANALYSIS_SR * FRAME), N_FFT, self.hann, center=True, pad_mode="constant",
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
        hop_samples = int(ANALYSIS_SR * FRAME)
        for si, (a, b) in enumerate(spans):
            wav, sr = read_span(audio_path, a, b)
            if sr != ANALYSIS_SR:
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
        spread subset of windows (average linkage is quadratic in their number)."""
        reliable = np.flatnonzero(weights >= 0.5)
        if len(reliable) < 2:
            reliable = np.arange(len(emb))
        if len(reliable) > MAX_CLUSTERED:
            reliable = reliable[np.linspace(0, len(reliable) - 1, MAX_CLUSTERED).round().astype(int)]
        x = emb[reliable].astype(np.float64)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)
        hi = max(1, min(max_speakers or MAX_SPEAKERS, len(x)))
        lo = max(1, min(min_speakers, hi))
        min_windows = max(1, int(np.ceil(self.s.min_speaker / self.s.hop)))
        # OpenBLAS reads its thread count once at import, before the runner limits threads.
        with threadpool_limits(self.num_threads):
            labels = ahc_speakers(x, lo, hi, self.s.threshold, min_windows)
        return _centroids(x, labels)

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
        return Diarization(merge_turns(self.resegment(emb @ centroids.T, index, spans), self.s.merge_gap))

    def resegment(self, sim: np.ndarray, index: list[tuple[int, int, int]],
                  spans: list[tuple[float, float]]) -> list[TurnTuple]:
        """Turns from window-to-speaker similarities (windows, speakers), span by span.

        A frame's score for a speaker is the mean similarity of the windows covering it. The
        speaker sequence inside a speech span maximises the summed score (similarity x seconds)
        minus ``change_penalty`` per speaker change (Viterbi): a short change survives only when
        its evidence is strong, a long one whenever it is consistent. The scores are constant
        between window edges, so the search runs on those pieces and is exact."""
        turns: list[TurnTuple] = []
        by_span: dict[int, list[int]] = {}
        for w, (si, _, _) in enumerate(index):
            by_span.setdefault(si, []).append(w)
        k = sim.shape[1]
        for si, ws in by_span.items():
            a, b = spans[si]
            edges = sorted({f for w in ws for f in index[w][1:]})
            n = edges[-1]
            total = np.zeros((len(edges) - 1, k))
            count = np.zeros(len(edges) - 1)
            pos = {f: i for i, f in enumerate(edges)}
            for w in ws:
                _, f0, f1 = index[w]
                total[pos[f0]:pos[f1]] += sim[w]
                count[pos[f0]:pos[f1]] += 1
            seconds = np.diff(edges) * FRAME
            gain = total / np.maximum(count, 1)[:, None] * seconds[:, None]
            path = viterbi(gain, self.s.change_penalty)
            for (f0, f1, spk) in _runs(path):
                t0 = a + edges[f0] * FRAME
                t1 = b if edges[f1] >= n else min(b, a + edges[f1] * FRAME)
                if t1 > t0:
                    turns.append((t0, t1, f"spk{spk}"))
        return turns


def viterbi(gain: np.ndarray, penalty: float) -> np.ndarray:
    """Label per row maximising the summed ``gain`` (pieces, labels) minus ``penalty`` per change."""
    n, k = gain.shape
    score = gain[0].copy()
    back = np.zeros((n, k), int)
    for t in range(1, n):
        stay = score
        best = int(np.argmax(score))
        switch = score[best] - penalty
        back[t] = np.where(stay >= switch, np.arange(k), best)
        score = np.maximum(stay, switch) + gain[t]
    path = np.zeros(n, int)
    path[-1] = int(np.argmax(score))
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def ahc_speakers(x: np.ndarray, min_k: int, max_k: int, threshold: float, min_windows: int) -> np.ndarray:
    """Speaker label per row of ``x`` (unit vectors) by average-linkage agglomerative clustering:
    groups of windows whose mean pairwise cosine similarity is at least ``threshold`` are one
    speaker (the count is where merging stops, K = 1 included), within [min_k, max_k]. A group
    of fewer than ``min_windows`` windows is not a speaker of its own (overlapped speech,
    laughter, a noise burst): its windows go to the most similar remaining group."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(x)
    if n < 2:
        return np.zeros(n, int)
    tree = linkage(x, "average", metric="cosine")
    labels = fcluster(tree, 1.0 - threshold, "distance")
    k = len(np.unique(labels))
    if not min_k <= k <= max_k:
        labels = fcluster(tree, min(max(k, min_k), max_k), "maxclust")
    labels = np.unique(labels, return_inverse=True)[1]
    while True:
        sizes = np.bincount(labels)
        small = int(np.argmin(sizes))
        if len(sizes) <= min_k or sizes[small] >= min_windows:
            return labels
        c = _centroids(x, labels)
        sim = c @ c[small]
        sim[small] = -np.inf
        labels[labels == small] = int(np.argmax(sim))
        labels = np.unique(labels, return_inverse=True)[1]


def _centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    c = np.stack([x[labels == k].mean(0) for k in np.unique(labels)])
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _runs(label: np.ndarray) -> list[list[int]]:
    """[first frame, end frame, label] of each run of equal labels."""
    cuts = np.flatnonzero(np.diff(label)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(label)]])
    return [[int(s), int(e), int(label[s])] for s, e in zip(starts, ends)]
