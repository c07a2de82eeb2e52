"""ASR backends: one small protocol, chosen by name in the config (``stages.asr.backends``).

A backend is built once per worker with ``load_backend(name, options, device, num_threads)`` and
then transcribes lists of 16 kHz mono float32 arrays, each at most ``max_seconds`` long::

    from pipeline.backends.asr import load_backend
    asr = load_backend("hf-whisper", {"model": "/models/whisper-d-v1a",
                                      "processor": "/models/whisper-large-v2"}, device="cuda")
    out = asr.transcribe([wave1, wave2], language="en")   # list[Transcript], same order
    out[0].text        # clean text, special tokens removed
    out[0].raw         # hf-whisper: the decoded sequence WITH special tokens, e.g.
                       # "<|startoftranscript|><|en|><|transcribe|><|notimestamps|> [S1] Hi. [S2] Hello.<|endoftext|>"
    out[0].confidence  # 0..1 or None (each backend documents its score)
    out[0].words       # [Word(start, end, text, probability)] from backends whose
                       # ``word_timestamps`` is True (faster-whisper), else None
    asr.detect_language([wave1])                    # [{"en": 0.97, "de": 0.01, ...}] (Whisper backends)

The backend splits the list into model batches itself (its ``batch_size`` option); callers keep
lists short enough to hold in memory. ``language=None`` lets a Whisper backend identify the
language of each item while decoding; other backends ignore ``language``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

SAMPLE_RATE = 16000

# name in the config -> "module:Class"; the module also defines the options model ``<Class>.Options``.
BACKENDS = {
    "whisper": "pipeline.backends.asr.whisper:WhisperBackend",
    "hf-whisper": "pipeline.backends.asr.hf_whisper:HfWhisperBackend",
    "funasr": "pipeline.backends.asr.funasr:FunAsrBackend",
    "pocketsphinx": "pipeline.backends.asr.pocketsphinx:PocketSphinxBackend",
    "faster-whisper": "pipeline.backends.asr.faster_whisper:FasterWhisperBackend",
}


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


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise KeyError(f"unknown ASR backend {name!r}; known: {', '.join(BACKENDS)}")
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_backend(name: str, options: BaseModel | dict[str, Any] | None = None, device: str = "cpu",
                 num_threads: int = 1) -> AsrBackend:
    """Build backend ``name`` (loads its model). ``options`` is the backend's section of the
    config (a dict or its ``Options`` model); ``device`` is "cpu" or "cuda"."""
    cls = backend_class(name)
    if not isinstance(options, cls.Options):
        options = cls.Options.model_validate(options or {})
    return cls(options, device=device, num_threads=num_threads)


def as_float32(audio: np.ndarray, what: str = "audio") -> np.ndarray:
    """Checked mono float32 view of one item; every backend takes this shape."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected mono 1-D samples at {SAMPLE_RATE} Hz, got shape {x.shape}")
    return x


def looks_like_path(ref: str) -> bool:
    """A reference meant as a file system path (never sent to a hub, even when missing)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith((".pt", ".bin", ".safetensors"))


def batches(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield range(i, min(n, i + size))
