"""Offline diarization from VAD spans and resemblyzer speaker embeddings.

1. Speech spans (from VAD) are cut into short overlapping windows (default 1.5 s, hop 0.75 s;
   a shorter span is one window) and each window gets a GE2E speaker embedding from
   resemblyzer's `VoiceEncoder`, whose weights ship in the pip package. Every window is brought
   to the same loudness first, so a quiet speaker is not a different speaker.
2. Speakers: windows are grouped with the recording's mean embedding removed (average linkage,
   then spherical k-means), for K = 2, 3, ... in turn. K grows while every two groups stay
   *separated*: their mean cross-similarity, over the geometric mean of each group's inner
   similarity (pairs of windows sharing audio left out), is below ``threshold``, and every
   group holds ``min_speaker`` seconds. That ratio is the cosine between the speakers' mean
   embeddings whatever the window noise, so one threshold holds for clean synthetic voices and
   for real recordings, whose raw similarities are all higher (same room and microphone):
   measured 0.95-1.0 for two halves of one voice, 0.58-0.87 between espeak voices, 0.66-0.91
   between the people of the real recordings in ``../shared/realspeech`` and pyannote's sample.
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
SAME_VOICE = 0.8  # mean cosine similarity of two resemblyzer windows of one voice (real and synthetic)
PRIOR_PAIRS = 2.0  # weight of that prior in window pairs


class EmbeddedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: float = Field(1.5, ge=0.5, le=6.0, description="seconds of speech behind one speaker embedding")
    hop: float = Field(0.75, gt=0, description="seconds between window starts (at most window)")
    threshold: float = Field(0.91, gt=0, le=1, description="two groups of windows whose separation (cross over inner similarity) reaches this are one speaker (lower finds fewer speakers)")
    min_speaker: float = Field(2.0, ge=0, description="seconds of clustered windows (count x hop) a speaker needs")
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
    def cluster(self, emb: np.ndarray, index: list[tuple[int, int, int]], weights: np.ndarray,
                min_speakers: int, max_speakers: int | None) -> np.ndarray:
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
        # OpenBLAS reads its thread count once at import, before the runner limits threads.
        with threadpool_limits(self.num_threads):
            labels = count_speakers(x, _disjoint(index, reliable), self.s.hop, lo, hi, self.s.threshold,
                                    self.s.min_speaker)
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
        centroids = self.cluster(emb, index, weights, min_speakers, max_speakers)
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


def count_speakers(x: np.ndarray, valid: np.ndarray, seconds: float, min_k: int, max_k: int,
                   threshold: float, min_speaker: float) -> np.ndarray:
    """Speaker label per row of ``x`` (unit window embeddings); ``valid`` marks the pairs of
    windows that share no audio, ``seconds`` is the speech one window stands for.

    For K = 2, 3, ... the windows are split into K groups (:func:`partition`); K is kept while
    every pair of groups is separated (:func:`separation` below ``threshold``) and every group
    holds at least ``min_speaker`` seconds, and the search stops at the first K that fails.
    The count is thus decided by how different the groups are compared with how coherent each
    one is (a ratio that window noise does not move), not by a similarity level that differs
    between clean synthetic voices and real recordings."""
    n = len(x)
    labels = np.zeros(n, int)
    gram = x @ x.T
    for k in range(2, min(max_k, n) + 1):
        cand = partition(x, k)
        if cand.max() + 1 < k:
            break
        ok = (separation(gram, valid, cand).max() < threshold
              and np.bincount(cand).min() * seconds >= min_speaker)
        if not ok and k > min_k:
            break
        labels = cand
    if labels.max() + 1 < min_k <= n:
        labels = partition(x, min_k)
    return labels


def partition(x: np.ndarray, k: int, iterations: int = 10) -> np.ndarray:
    """``k`` groups of unit vectors: average-linkage clustering then spherical k-means, both on
    the embeddings minus the recording's mean. Centring removes what all windows of a recording
    share (channel, room, microphone), which on real recordings dominates the raw similarities
    and hides the speaker differences; it is used only to find the groups, not to count them."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    y = x - x.mean(0)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-10)
    # Cosine distances computed here: a window equal to the mean (all windows alike) centres to
    # zero, where scipy's cosine metric gives NaN.
    dist = np.clip(1.0 - y @ y.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), "average"), k, "maxclust") - 1
    labels = np.unique(labels, return_inverse=True)[1]
    for _ in range(iterations):
        new = np.argmax(y @ _centroids(y, labels).T, axis=1)
        new = np.unique(new, return_inverse=True)[1]
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def separation(gram: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, K) mean similarity between two groups over the geometric mean of the mean similarity
    inside each group, from the windows' Gram matrix and only over pairs in ``valid`` (windows
    sharing audio would look alike whoever speaks). With independent window noise this is the
    cosine of the two speakers' mean embeddings: near 1 for two groups of one voice (measured
    0.95-1.0 on monologues), lower for two people. A group's inner similarity is shrunk toward
    ``SAME_VOICE`` so that a group of a few windows does not look perfectly coherent."""
    onehot = np.eye(labels.max() + 1)[labels]
    sums = onehot.T @ (gram * valid) @ onehot
    pairs = onehot.T @ valid @ onehot
    within = np.maximum((np.diag(sums) + PRIOR_PAIRS * SAME_VOICE) / (np.diag(pairs) + PRIOR_PAIRS), 1e-6)
    r = sums / np.maximum(pairs, 1) / np.sqrt(np.outer(within, within))
    np.fill_diagonal(r, -np.inf)
    return r


def _disjoint(index: list[tuple[int, int, int]], rows: np.ndarray) -> np.ndarray:
    """(n, n) 1.0 where windows ``rows`` of ``index`` share no frame, else 0.0."""
    span, f0, f1 = np.array([index[i] for i in rows]).T
    shared = (span[:, None] == span[None]) & (f0[:, None] < f1[None]) & (f0[None] < f1[:, None])
    return (~shared).astype(np.float64)


def _centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    c = np.stack([x[labels == k].mean(0) for k in np.unique(labels)])
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-10)


def _runs(label: np.ndarray) -> list[list[int]]:
    """[first frame, end frame, label] of each run of equal labels."""
    cuts = np.flatnonzero(np.diff(label)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(label)]])
    return [[int(s), int(e), int(label[s])] for s, e in zip(starts, ends)]
