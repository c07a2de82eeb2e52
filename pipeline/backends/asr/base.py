"""What every ASR backend shares: its result types, its protocol and input checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline.audio import ANALYSIS_SR


@dataclass
class Word:
    start: float  # seconds from the start of the item, non-decreasing along the item
    end: float
    text: str
    probability: float  # 0..1


@dataclass
class Transcript:
    text: str  # special tokens removed, stripped
    confidence: float | None  # 0..1; None when the backend has no score for this item
    raw: str = ""  # decoded sequence with special tokens (hf-whisper, whisper); else = text
    words: list[Word] | None = None  # backends with word_timestamps = True; else None


@runtime_checkable
class AsrBackend(Protocol):
    name: str
    max_seconds: float  # longest item transcribe() accepts
    can_identify_language: bool
    word_timestamps: bool  # transcribe() fills Transcript.words

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        """One Transcript per 16 kHz mono float32 array, in order."""
        ...

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        """Probability of every language the model knows, per array (sums to 1).
        Backends without language identification raise NotImplementedError."""
        ...


def as_float32(audio: np.ndarray, what: str = "audio") -> np.ndarray:
    """Checked mono float32 view of one item; every backend takes this shape."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected mono 1-D samples at {ANALYSIS_SR} Hz, got shape {x.shape}")
    return x


def looks_like_path(ref: str) -> bool:
    """A reference meant as a file system path (never sent to a hub, even when missing)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith((".pt", ".bin", ".safetensors"))


def batches(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield range(i, min(n, i + size))
