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

from typing import Any

from pydantic import BaseModel

from pipeline.backends import Registry
from pipeline.backends.asr.base import AsrBackend, Transcript, Word

__all__ = ["BACKENDS", "AsrBackend", "Transcript", "Word", "backend_class", "load_backend"]

# name in the config -> "module:Class"; the class's ``Options`` is its section of stages.asr.
BACKENDS = Registry("ASR", {
    "faster-whisper": "pipeline.backends.asr.faster_whisper:FasterWhisperBackend",
    "whisper": "pipeline.backends.asr.whisper:WhisperBackend",
    "hf-whisper": "pipeline.backends.asr.hf_whisper:HfWhisperBackend",
    "funasr": "pipeline.backends.asr.funasr:FunAsrBackend",
    "pocketsphinx": "pipeline.backends.asr.pocketsphinx:PocketSphinxBackend",
})


def backend_class(name: str) -> type:
    return BACKENDS.get(name)


def load_backend(name: str, options: BaseModel | dict[str, Any] | None = None, device: str = "cpu",
                 num_threads: int = 1) -> AsrBackend:
    """Build backend ``name`` (loads its model). ``options`` is the backend's section of the
    config (a dict or its ``Options`` model); ``device`` is "cpu" or "cuda"."""
    return BACKENDS.build(name, options, device, num_threads)
