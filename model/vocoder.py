"""Log-mel -> 24 kHz waveform: Vocos (the official vocoder) or a download-free Griffin-Lim fallback.

Both take unscaled Vocos log-mels (B, 100, T), i.e. the model output divided by ``FEAT_SCALE``, and
return (B, N) float waveforms clamped to [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from model.features import HOP_LENGTH, N_FFT, N_MELS, SAMPLING_RATE, mel_filterbank

DEFAULT_VOCOS = "charactr/vocos-mel-24khz"
GRIFFIN_LIM = "griffin-lim"


class Vocoder:
    sampling_rate: int = SAMPLING_RATE

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "Vocoder":
        return self


def _check_features(features: torch.Tensor) -> torch.Tensor:
    if features.ndim == 2:
        features = features.unsqueeze(0)
    if features.ndim != 3 or features.shape[1] != N_MELS:
        raise ValueError(f"vocoder input must be (B, {N_MELS}, T) log-mels, got {tuple(features.shape)}")
    return features


class VocosVocoder(Vocoder):
    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def to(self, device) -> "VocosVocoder":
        self.model.to(device)
        return self

    @torch.inference_mode()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        features = _check_features(features)
        device = next(self.model.parameters()).device
        wave = self.model.decode(features.to(device, torch.float32))
        return wave.clamp(-1.0, 1.0)


class GriffinLimVocoder(Vocoder):
    """Inverts the magnitude mel: non-negative least squares through the filterbank, then fast
    Griffin-Lim (with momentum) on the Vocos STFT settings. Output length is T * 256."""

    def __init__(self, n_iter: int = 64, momentum: float = 0.99, nnls_iter: int = 100, seed: int = 0):
        self.n_iter = n_iter
        self.momentum = momentum
        self.nnls_iter = nnls_iter
        self.seed = seed

    def mel_to_magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 100, T) magnitude mel -> (B, 513, T) non-negative linear magnitude."""
        fb = mel_filterbank().to(mel.device, torch.float32)  # (513, 100)
        mel = mel.to(torch.float32)
        # start from the clipped pseudo-inverse, refine with multiplicative NNLS updates
        # (they keep the solution non-negative and never increase ||fb^T S - mel||).
        mag = torch.clamp(torch.linalg.pinv(fb.T) @ mel, min=1e-8)
        fb_mel = fb @ mel
        for _ in range(self.nnls_iter):
            mag = mag * fb_mel / (fb @ (fb.T @ mag) + 1e-12)
        return mag.to(torch.float32)

    @torch.inference_mode()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        features = _check_features(features).to(torch.float32)
        mag = self.mel_to_magnitude(torch.exp(features))
        # one repeated frame so a signal of exactly T * hop samples has a matching STFT (T + 1 frames)
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)
        length = features.shape[-1] * HOP_LENGTH
        window = torch.hann_window(N_FFT, periodic=True, device=mag.device)

        def stft(x):
            return torch.stft(x, N_FFT, HOP_LENGTH, N_FFT, window, center=True, pad_mode="reflect", return_complex=True)

        def istft(s):
            return torch.istft(s, N_FFT, HOP_LENGTH, N_FFT, window, center=True, length=length)

        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        phase = torch.rand(mag.shape, generator=gen) * 2 * torch.pi
        angles = torch.polar(torch.ones_like(mag), phase.to(mag.device))
        prev = torch.zeros_like(angles)
        for _ in range(self.n_iter):
            rebuilt = stft(istft(mag * angles))
            angles = rebuilt - (self.momentum / (1 + self.momentum)) * prev
            angles = angles / (angles.abs() + 1e-16)
            prev = rebuilt
        return istft(mag * angles).clamp(-1.0, 1.0)


# The only classes a Vocos config.yaml may name, per part. A config is data: it is never used to
# import a module or call a name it chooses (``vocos.pretrained.instantiate_class`` would do both).
VOCOS_CLASSES = {
    "feature_extractor": ("vocos.feature_extractors.MelSpectrogramFeatures", "vocos.feature_extractors.EncodecFeatures"),
    "backbone": ("vocos.models.VocosBackbone", "vocos.models.VocosResNetBackbone"),
    "head": ("vocos.heads.ISTFTHead", "vocos.heads.IMDCTSymExpHead", "vocos.heads.IMDCTCosHead"),
}


def _plain(value) -> bool:
    """Numbers, strings, booleans and lists of them: no nested mapping that could name a class."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _build_vocos(config, config_path: Path):
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a mapping with feature_extractor, backbone and head")
    import vocos.feature_extractors
    import vocos.heads
    import vocos.models
    from vocos import Vocos

    modules = {"vocos.feature_extractors": vocos.feature_extractors, "vocos.models": vocos.models,
               "vocos.heads": vocos.heads}
    parts = {}
    for part, allowed in VOCOS_CLASSES.items():
        section = config.get(part)
        cls_path = section.get("class_path") if isinstance(section, dict) else None
        if cls_path not in allowed:
            raise ValueError(f"{config_path}: {part}.class_path must be an allowed vocos class {list(allowed)}, got {cls_path!r}")
        init_args = section.get("init_args") or {}
        if not isinstance(init_args, dict) or not all(isinstance(k, str) and _plain(v) for k, v in init_args.items()):
            raise ValueError(f"{config_path}: {part}.init_args must map names to plain values")
        module, name = cls_path.rsplit(".", 1)
        try:
            parts[part] = getattr(modules[module], name)(**init_args)
        except TypeError as e:
            raise ValueError(f"{config_path}: {part}.init_args do not fit {cls_path}: {e}") from None
    return Vocos(**parts)


def _load_vocos_dir(directory: Path) -> VocosVocoder:
    config_path, weights_path = directory / "config.yaml", directory / "pytorch_model.bin"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"Vocos directory {directory} lacks {p.name} (needs config.yaml and pytorch_model.bin)")
    with open(config_path) as f:
        config = yaml.safe_load(f)
    model = _build_vocos(config, config_path)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: weights do not match {config_path}: {err}") from err
    return VocosVocoder(model)


def load_vocoder(name_or_path: str | os.PathLike | None = None) -> Vocoder:
    """``None`` -> Vocos ``charactr/vocos-mel-24khz`` from the hub; ``"griffin-lim"`` -> the fallback;
    a local directory with config.yaml + pytorch_model.bin; or another hub id."""
    if name_or_path is not None and str(name_or_path) == GRIFFIN_LIM:
        return GriffinLimVocoder()
    name = DEFAULT_VOCOS if name_or_path is None else str(name_or_path)
    path = Path(name)
    if path.is_dir():
        return _load_vocos_dir(path)
    if path.exists():
        raise ValueError(f"vocoder path {path} is not a directory (expected config.yaml + pytorch_model.bin inside)")
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(repo_id=name, filename="config.yaml")
        hf_hub_download(repo_id=name, filename="pytorch_model.bin")
    except Exception as err:
        from pipeline.backends.hub import model_not_found

        raise model_not_found(
            name, "Vocos vocoder",
            f"pass a local directory holding config.yaml and pytorch_model.bin, or {GRIFFIN_LIM!r} for the download-free fallback",
            err,
        ) from err
    return _load_vocos_dir(Path(config).parent)
