"""Speaker embedders and a diarizer for cpSIM (all on 16 kHz mono float audio).

* ``ResemblyzerEmbedder``: GE2E d-vectors; the weights ship inside the resemblyzer package.
* ``SimpleDiarizer``: energy VAD + resemblyzer embeddings of short sliding windows, clustered into
  two speakers. A download-free stand-in for the reference's pyannote pipeline.
* ``WavLMEcapaEmbedder``: the paper's ECAPA-TDNN on WavLM-Large hidden states, from a local
  ``wavlm_large_finetune.pth`` (head) and a local Hugging Face WavLM directory (backbone).

cpSIM values from the resemblyzer models are NOT comparable with the paper's numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.audio import ANALYSIS_SR



class ResemblyzerEmbedder:
    def __init__(self, device: str = "cpu", encoder=None):
        from resemblyzer import VoiceEncoder

        self.encoder = encoder if encoder is not None else VoiceEncoder(device, verbose=False)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        from resemblyzer import preprocess_wav

        wave = np.asarray(wave, dtype=np.float32)
        if len(wave) < ANALYSIS_SR // 10:
            raise ValueError(f"audio too short for a speaker embedding ({len(wave)} samples)")
        trimmed = preprocess_wav(wave)
        # the VAD trim can leave almost nothing of very short or quiet clips
        return self.encoder.embed_utterance(trimmed if len(trimmed) >= ANALYSIS_SR // 2 else wave)


class SimpleDiarizer:
    """Two-speaker diarization: (start_s, end_s, "SPEAKER_00" | "SPEAKER_01") segments."""

    def __init__(self, encoder=None, window_s: float = 1.2, hop_s: float = 0.2, vad_db: float = 35.0, device: str = "cpu"):
        if encoder is None:
            from resemblyzer import VoiceEncoder

            encoder = VoiceEncoder(device, verbose=False)
        self.encoder = encoder
        self.window = int(round(window_s * 100))  # resemblyzer mel frames are 10 ms
        self.hop = max(1, int(round(hop_s * 100)))
        self.vad_db = vad_db

    def _voiced(self, wave: np.ndarray, n_frames: int) -> np.ndarray:
        # 10 ms frames, voiced when within vad_db of the loudest frame (and not digital silence)
        wave = wave[: n_frames * 160]
        frames = np.pad(wave, (0, n_frames * 160 - len(wave))).reshape(n_frames, 160)
        db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
        return db > max(db.max() - self.vad_db, -80.0)

    def __call__(self, wave: np.ndarray) -> list[tuple[float, float, str]]:
        from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram
        from resemblyzer.hparams import audio_norm_target_dBFS

        wave = normalize_volume(np.asarray(wave, dtype=np.float32), audio_norm_target_dBFS, increase_only=True)
        mel = wav_to_mel_spectrogram(wave)  # (frames, 40)
        n = len(mel)
        voiced = self._voiced(wave, n)
        if voiced.sum() == 0:
            return []
        starts = list(range(0, max(1, n - self.window + 1), self.hop))
        if n > self.window and starts[-1] + self.window < n:
            starts.append(n - self.window)
        starts = [s for s in starts if voiced[s : s + self.window].mean() >= 0.3]
        labels = np.zeros(n, dtype=np.int64)
        if len(starts) >= 2:
            batch = np.stack([_fit(mel[s : s + self.window], self.window) for s in starts])
            with torch.no_grad():
                emb = self.encoder(torch.from_numpy(batch).to(self.encoder.device)).cpu().numpy()
            assign = _two_clusters(emb)
            # each frame takes the vote of the windows covering it, weighted towards window centres
            votes = np.zeros((n, 2))
            tri = 1.0 - np.abs(np.linspace(-1, 1, self.window)) + 1e-3
            for s, a in zip(starts, assign):
                end = min(n, s + self.window)
                votes[s:end, a] += tri[: end - s]
            covered = votes.sum(axis=1) > 0
            labels = np.where(covered, votes.argmax(axis=1), -1)
            labels = _fill_uncovered(labels)
        return _segments(labels, voiced)


def _fit(x: np.ndarray, length: int) -> np.ndarray:
    return x if len(x) == length else np.pad(x, ((0, length - len(x)), (0, 0)))


def _two_clusters(emb: np.ndarray) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
    return AgglomerativeClustering(n_clusters=2, metric="cosine", linkage="average").fit_predict(emb)


def _fill_uncovered(labels: np.ndarray) -> np.ndarray:
    # frames outside any kept window take the label of the nearest labelled frame
    idx = np.flatnonzero(labels >= 0)
    if len(idx) == 0:
        return np.zeros_like(labels)
    nearest = idx[np.clip(np.searchsorted(idx, np.arange(len(labels))), 0, len(idx) - 1)]
    prev = idx[np.clip(np.searchsorted(idx, np.arange(len(labels))) - 1, 0, len(idx) - 1)]
    pos = np.arange(len(labels))
    pick = np.where(np.abs(prev - pos) <= np.abs(nearest - pos), prev, nearest)
    return labels[pick]


def _segments(labels: np.ndarray, voiced: np.ndarray) -> list[tuple[float, float, str]]:
    out = []
    start = None
    for i in range(len(labels) + 1):
        cur = labels[i] if i < len(labels) and voiced[i] else None
        if start is not None and (cur is None or cur != labels[start]):
            out.append((start / 100.0, i / 100.0, f"SPEAKER_{int(labels[start]):02d}"))
            start = None
        if cur is not None and start is None:
            start = i
    return out


# --------------------------------------------------------------------------- WavLM + ECAPA-TDNN
# Submodule names follow the UniSpeech speaker-verification model so that the official
# wavlm_large_finetune.pth state dict (under "model") loads into the head.


class _ConvReluBn(nn.Module):
    def __init__(self, cin, cout, kernel_size=1, padding=0, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel_size, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class _Res2ConvReluBn(nn.Module):
    """Res2Net block: channel groups processed hierarchically, each fed the previous group's output."""

    def __init__(self, channels, kernel_size, padding, dilation, scale):
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels {channels} not divisible by scale {scale}")
        self.width = channels // scale
        n = scale - 1 if scale > 1 else 1
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation) for _ in range(n)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(n))
        self.scale = scale

    def forward(self, x):
        groups = torch.split(x, self.width, dim=1)
        out, sp = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = groups[i] if i == 0 else sp + groups[i]
            sp = bn(F.relu(conv(sp)))
            out.append(sp)
        if self.scale > 1:
            out.append(groups[len(self.convs)])
        return torch.cat(out, dim=1)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, bottleneck):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class _SERes2Block(nn.Module):
    def __init__(self, channels, dilation, scale=8, se_bottleneck=128):
        super().__init__()
        self.Conv1dReluBn1 = _ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = _Res2ConvReluBn(channels, 3, dilation, dilation, scale)
        self.Conv1dReluBn2 = _ConvReluBn(channels, channels)
        self.SE_Connect = _SqueezeExcite(channels, se_bottleneck)

    def forward(self, x):
        return x + self.SE_Connect(self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x))))


class _AttentiveStatsPool(nn.Module):
    def __init__(self, channels, attention_channels=128):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention_channels, 1)
        self.linear2 = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x):
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x))), dim=2)
        mean = (alpha * x).sum(dim=2)
        var = (alpha * x * x).sum(dim=2) - mean * mean
        return torch.cat([mean, var.clamp(min=1e-9).sqrt()], dim=1)


class EcapaTdnnHead(nn.Module):
    """ECAPA-TDNN over a softmax-weighted sum of SSL hidden layers -> speaker embedding."""

    def __init__(self, num_layers: int, feat_dim: int = 1024, channels: int = 512, emb_dim: int = 256, se_bottleneck: int = 128, attention_channels: int = 128):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(num_layers))
        self.instance_norm = nn.InstanceNorm1d(feat_dim)
        self.layer1 = _ConvReluBn(feat_dim, channels, kernel_size=5, padding=2)
        self.layer2 = _SERes2Block(channels, dilation=2, se_bottleneck=se_bottleneck)
        self.layer3 = _SERes2Block(channels, dilation=3, se_bottleneck=se_bottleneck)
        self.layer4 = _SERes2Block(channels, dilation=4, se_bottleneck=se_bottleneck)
        self.conv = nn.Conv1d(3 * channels, 3 * channels, 1)
        self.pooling = _AttentiveStatsPool(3 * channels, attention_channels)
        self.bn = nn.BatchNorm1d(6 * channels)
        self.linear = nn.Linear(6 * channels, emb_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (L, B, T, C) -> (B, emb_dim)."""
        w = torch.softmax(self.feature_weight, dim=-1).view(-1, 1, 1, 1)
        x = (w * hidden_states).sum(dim=0).transpose(1, 2) + 1e-6
        x = self.instance_norm(x)
        out1 = self.layer1(x)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        x = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(x)))


class WavLMEcapaEmbedder:
    """ECAPA-TDNN (head from ``checkpoint``) on a local Hugging Face WavLM (``wavlm_dir``).

    Like the reference evaluation, the backbone comes from ``wavlm_dir`` and only the head's keys of
    the checkpoint are used (its ``feature_extract.*`` keys are in s3prl naming and are ignored).
    """

    def __init__(self, checkpoint: str | os.PathLike, wavlm_dir: str | os.PathLike, device: str = "cpu", emb_dim: int | None = None):
        from transformers import WavLMModel

        checkpoint, wavlm_dir = Path(checkpoint), Path(wavlm_dir)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"WavLM-ECAPA checkpoint not found: {checkpoint}")
        if not (wavlm_dir / "config.json").is_file():
            raise FileNotFoundError(f"WavLM directory {wavlm_dir} has no config.json (a Hugging Face WavLM-Large dir)")
        self.device = torch.device(device)
        self.wavlm = WavLMModel.from_pretrained(str(wavlm_dir), local_files_only=True).eval().to(self.device)
        self.normalize = _do_normalize(wavlm_dir)

        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        head_state = {k: v for k, v in state.items() if not k.startswith("feature_extract.")}
        if "feature_weight" not in head_state or "linear.weight" not in head_state:
            raise ValueError(f"{checkpoint}: not an ECAPA-TDNN checkpoint (no feature_weight / linear.weight)")
        cfg = self.wavlm.config
        num_layers = cfg.num_hidden_layers + 1
        if head_state["feature_weight"].numel() != num_layers:
            raise ValueError(
                f"{checkpoint}: feature_weight has {head_state['feature_weight'].numel()} layers, "
                f"the WavLM in {wavlm_dir} gives {num_layers} hidden states"
            )
        channels = head_state["layer1.conv.weight"].shape[0]
        self.head = EcapaTdnnHead(
            num_layers,
            feat_dim=cfg.hidden_size,
            channels=channels,
            emb_dim=emb_dim or head_state["linear.weight"].shape[0],
            se_bottleneck=head_state["layer2.SE_Connect.linear1.weight"].shape[0],
            attention_channels=head_state["pooling.linear1.weight"].shape[0],
        )
        try:
            self.head.load_state_dict(head_state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{checkpoint}: head weights do not match the ECAPA-TDNN layout: {err}") from err
        self.head.eval().to(self.device)

    @torch.inference_mode()
    def __call__(self, wave: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(wave, dtype=np.float32)).to(self.device).unsqueeze(0)
        if self.normalize:
            x = (x - x.mean()) / torch.sqrt(x.var() + 1e-7)
        hidden = self.wavlm(x, output_hidden_states=True).hidden_states
        return self.head(torch.stack(hidden, dim=0))[0].cpu().numpy()


def _do_normalize(wavlm_dir: Path) -> bool:
    cfg = wavlm_dir / "preprocessor_config.json"
    if cfg.is_file():
        with open(cfg) as f:
            return bool(json.load(f).get("do_normalize", True))
    return True


def load_embedder(name: str = "resemblyzer", checkpoint: str | None = None, wavlm_dir: str | None = None, device: str = "cpu"):
    """"resemblyzer" (offline, default) or "wavlm-ecapa" (needs ``checkpoint`` and ``wavlm_dir``)."""
    if name == "resemblyzer":
        return ResemblyzerEmbedder(device)
    if name == "wavlm-ecapa":
        if not checkpoint or not wavlm_dir:
            raise ValueError("the wavlm-ecapa embedder needs a checkpoint (wavlm_large_finetune.pth) and a WavLM directory")
        return WavLMEcapaEmbedder(checkpoint, wavlm_dir, device)
    raise ValueError(f"unknown speaker embedder {name!r} (choose 'resemblyzer' or 'wavlm-ecapa')")
