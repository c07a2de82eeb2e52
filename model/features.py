"""Vocos 100-bin log-mel front end at 24 kHz (the features ZipVoice is trained on) and audio loading.

The mel is exactly the one of the ``charactr/vocos-mel-24khz`` vocoder: n_fft 1024, periodic Hann
window of 1024, hop 256, centred STFT with reflect padding, magnitude (power 1), 100 HTK mels over
0..12 kHz without filterbank normalisation, then ``ln(max(x, 1e-7))``. The model sees the features
multiplied by ``FEAT_SCALE``; ``extract`` returns them unscaled.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

FEAT_SCALE = 0.1
SAMPLING_RATE = 24000
N_FFT = 1024
HOP_LENGTH = 256
N_MELS = 100
LOG_CLAMP = 1e-7


def num_frames(num_samples: int, hop: int = HOP_LENGTH) -> int:
    """Frame count of ``num_samples`` samples: lhotse's round(N / hop), written as floor((N + hop/2) / hop)."""
    return (int(num_samples) + hop // 2) // hop


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def _mel_fbank_np(sampling_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    # Triangles are built on the linear-frequency axis between mel-spaced corner points, so a
    # bin's weight is linear in Hz (the HTK/torchaudio construction, not librosa's Slaney one).
    n_freqs = n_fft // 2 + 1
    all_freqs = np.linspace(0.0, sampling_rate // 2, n_freqs)
    m_pts = np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    f_pts = _mel_to_hz_htk(m_pts)
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))  # (n_freqs, n_mels)


def mel_filterbank(
    sampling_rate: int = SAMPLING_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """HTK mel filterbank without normalisation, shape (n_fft // 2 + 1, n_mels), float32."""
    f_max = sampling_rate / 2 if f_max is None else f_max
    fb = _mel_fbank_np(int(sampling_rate), int(n_fft), int(n_mels), float(f_min), float(f_max))
    return torch.from_numpy(fb.astype(np.float32))


def stft_magnitude(wave: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP_LENGTH) -> torch.Tensor:
    """|STFT| of (..., N) float32 audio: (..., n_fft // 2 + 1, 1 + N // hop)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    shape = wave.shape
    spec = torch.stft(
        wave.reshape(-1, shape[-1]),
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    return spec.abs().reshape(*shape[:-1], spec.shape[-2], spec.shape[-1])


def log_mel(wave: torch.Tensor, sampling_rate: int = SAMPLING_RATE) -> torch.Tensor:
    """Vocos log-mel of (..., N) audio: (..., 100, 1 + N // 256), natural log, not scaled."""
    mag = stft_magnitude(wave)
    fb = mel_filterbank(sampling_rate).to(mag.device, mag.dtype)
    mel = torch.matmul(mag.transpose(-1, -2), fb).transpose(-1, -2)
    return torch.log(torch.clamp(mel, min=LOG_CLAMP))


def _as_float_tensor(wave) -> torch.Tensor:
    if isinstance(wave, torch.Tensor):
        t = wave.detach().to("cpu", torch.float32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(wave, dtype=np.float32)))
    if t.ndim not in (1, 2):
        raise ValueError(f"expected audio shaped (N,) or (C, N), got {tuple(t.shape)}")
    return t


SINC_ZERO_CROSSINGS = 6  # lowpass_filter_width of torchaudio's resampler
SINC_ROLLOFF = 0.99


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase Hann-windowed sinc filters (new, 1, K) for the reduced ratio orig -> new.

    Output sample j of each block of `new` lies at input position j * orig / new; its filter is a
    sinc of cutoff min(orig, new) * rolloff (in reduced units), cut after 6 zero crossings by a
    cos^2 window. Built in float64 and used in float32, like `torchaudio.transforms.Resample` (the
    reference's prompt resampler), whose quirk of forming the output phase j / new in float32 is
    kept so the filters agree to the last bit.
    """
    cutoff = min(orig, new) * SINC_ROLLOFF
    width = math.ceil(SINC_ZERO_CROSSINGS * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    phase = (torch.arange(0, -new, -1) / new).to(torch.float64)
    x = (phase[:, None] + taps[None, :]) * cutoff
    x = x.clamp(-SINC_ZERO_CROSSINGS, SINC_ZERO_CROSSINGS)
    window = torch.cos(x * math.pi / SINC_ZERO_CROSSINGS / 2) ** 2
    x = x * math.pi
    kernel = torch.where(x == 0, torch.ones_like(x), x.sin() / x)
    kernel = kernel * (window * (cutoff / orig))
    return kernel.to(torch.float32).unsqueeze(1), width


def resample_sinc(wave, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of (N,) or (C, N) float32 audio as the reference does it.

    The reference resamples prompts with `torchaudio.transforms.Resample` at its defaults
    (Hann-windowed sinc, 6 zero crossings, rolloff 0.99); soxr's steeper filter gives other mel values near the source
    band edge (about 6 in the log-mel for a 16 kHz prompt). Output length ceil(N * target / orig).
    """
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} -> {target_sr}")
    x = torch.as_tensor(np.ascontiguousarray(wave, dtype=np.float32))
    if orig_sr == target_sr:
        return x.numpy()
    g = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // g, target_sr // g
    kernel, width = _sinc_kernel(orig, new)
    shape = x.shape
    flat = torch.nn.functional.pad(x.reshape(-1, shape[-1]), (width, width + orig))
    out = torch.nn.functional.conv1d(flat.unsqueeze(1), kernel, stride=orig)  # (C, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * shape[-1] / orig)]
    return out.reshape(*shape[:-1], -1).contiguous().numpy()


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr resampling of (N,) or (C, N) float32 audio (what librosa does: the reference's
    evaluation resampler). Model audio goes through `resample_sinc`."""
    if int(orig_sr) == int(target_sr):
        return wave
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        return soxr.resample(wave, orig_sr, target_sr).astype(np.float32)
    return np.ascontiguousarray(soxr.resample(wave.T, orig_sr, target_sr).T.astype(np.float32))


class VocosFbank:
    """Vocos log-mel extractor. ``num_channels=2`` gives [ch0 | ch1] features of width 200."""

    def __init__(self, sampling_rate: int = SAMPLING_RATE, num_channels: int = 1):
        if num_channels not in (1, 2):
            raise ValueError(f"num_channels must be 1 or 2, got {num_channels}")
        self.sampling_rate = sampling_rate
        self.num_channels = num_channels
        self.hop_length = HOP_LENGTH
        self.feature_dim = N_MELS * num_channels

    def frame_shift(self) -> float:
        return self.hop_length / self.sampling_rate

    def extract(self, wave, sampling_rate: int) -> torch.Tensor:
        """Features (T, 100 * num_channels), T = num_frames(samples at self.sampling_rate)."""
        t = _as_float_tensor(wave)
        if sampling_rate != self.sampling_rate:
            t = torch.from_numpy(resample_sinc(t.numpy(), sampling_rate, self.sampling_rate))
        if self.num_channels == 1:
            if t.ndim == 2:
                t = t.mean(dim=0)
            t = t.unsqueeze(0)
        else:
            if t.ndim != 2 or t.shape[0] != self.num_channels:
                raise ValueError(
                    f"the stereo extractor needs audio shaped ({self.num_channels}, N), got {tuple(t.shape)}"
                )
        n = t.shape[-1]
        if n <= N_FFT // 2:  # reflect padding of the centred STFT needs more than n_fft/2 samples
            raise ValueError(f"audio too short for features: {n} samples, need more than {N_FFT // 2}")
        feats = log_mel(t, self.sampling_rate)  # (C, 100, T_stft)
        feats = torch.cat(list(feats), dim=0).T.contiguous()  # (T_stft, 100 * C), [ch0 | ch1]
        return _fix_length(feats, num_frames(n, self.hop_length))


def _fix_length(feats: torch.Tensor, target: int) -> torch.Tensor:
    if feats.shape[0] >= target:
        return feats[:target]
    pad = feats[-1:].expand(target - feats.shape[0], -1)
    return torch.cat([feats, pad], dim=0)


def load_audio(path: str | os.PathLike, sampling_rate: int = SAMPLING_RATE, mono: bool = True,
               resampler: str = "sinc") -> np.ndarray:
    """Read an audio file as float32 at ``sampling_rate``: (N,) when mono, else (C, N).

    libsndfile reads wav/flac/ogg(/mp3 in recent versions); anything else (m4a, opus in mp4, ...)
    is decoded by ffmpeg. Resampling: "sinc" (the reference's model-side torchaudio resampler,
    `resample_sinc`) or "soxr" (librosa's, used by the reference's evaluation).
    """
    if resampler not in ("sinc", "soxr"):
        raise ValueError(f"unknown resampler {resampler!r}: use 'sinc' or 'soxr'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as sf_err:  # libsndfile cannot read this container/codec
        data, sr = _read_with_ffmpeg(path, sf_err)
    wave = data.T  # (C, N)
    if wave.shape[1] == 0:
        raise ValueError(f"audio file has no samples: {path}")
    if mono:
        wave = wave.mean(axis=0)
    wave = (resample_sinc if resampler == "sinc" else resample)(
        np.ascontiguousarray(wave, dtype=np.float32), sr, sampling_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _read_with_ffmpeg(path: Path, sf_err: Exception) -> tuple[np.ndarray, int]:
    if shutil.which("ffmpeg") is None:
        raise ValueError(f"cannot decode audio file {path}: {sf_err} (and ffmpeg is not installed)") from sf_err
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "decoded.wav")
        proc = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(path), "-vn", "-c:a", "pcm_f32le", out],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            msg = proc.stderr.strip().splitlines()[-1:] or ["unknown error"]
            raise ValueError(f"cannot decode audio file {path}: libsndfile: {sf_err}; ffmpeg: {msg[0]}") from sf_err
        try:
            data, sr = sf.read(out, dtype="float32", always_2d=True)
        except Exception as err:
            raise ValueError(f"cannot decode audio file {path}: ffmpeg output unreadable ({err})") from err
    return data, sr

