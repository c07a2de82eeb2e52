"""Small audio files for tests, made on the spot (espeak-ng speech, tones, broken files)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf


def espeak(text: str, path: Path, voice: str = "en-us+m3") -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


def speech(text: str, voice: str = "en-us+m3", sr: int = 16000) -> np.ndarray:
    import tempfile

    import soxr

    with tempfile.TemporaryDirectory() as d:
        p = espeak(text, Path(d) / "s.wav", voice)
        x, r = sf.read(p, dtype="float32")
    return soxr.resample(x, r, sr).astype(np.float32) if r != sr else x


def ffmpeg_encode(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args, str(dst)], check=True)
    return dst
