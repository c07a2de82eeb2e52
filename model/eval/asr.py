"""ASR for WER/cpWER: ``asr(list of 16 kHz mono float arrays) -> list of transcripts``.

The recognisers are the pipeline's ASR backends (`pipeline.backends.asr`), so the corpus is
curated and the generated speech scored by the same code:

* a Whisper checkpoint through the ``hf-whisper`` backend; the paper scores English dialogues
  with WhisperD (``jordand/whisper-d-v1a``), a Whisper fine-tune that writes [S1]/[S2] turn tags,
  so the model's suppressed-token list is cleared (Whisper suppresses "[" by default) and the
  transcript is the decoded sequence with only Whisper's ``<|...|>`` markers removed;
* ``pocketsphinx``: the offline US-English decoder whose model ships in the package (weak, but
  real).

A wave longer than the backend's window (Whisper: 30 s) is transcribed in consecutive windows
whose texts are joined.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr import load_backend
from pipeline.backends.hub import ModelNotFound

WHISPER_D = "jordand/whisper-d-v1a"
_WHISPER_MARKER = re.compile(r"<\|[^|]*\|>")


class BackendASR:
    """A pipeline ASR backend as the evaluation's ``asr(waves) -> texts`` callable."""

    def __init__(self, backend, language: str | None):
        self.backend = backend
        self.language = language

    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        window = int(self.backend.max_seconds * ANALYSIS_SR)
        pieces, owner = [], []
        for i, w in enumerate(waves):
            w = np.asarray(w, dtype=np.float32)
            for start in range(0, max(len(w), 1), window):
                pieces.append(w[start:start + window])
                owner.append(i)
        texts = [""] * len(waves)
        for i, t in zip(owner, self.backend.transcribe(pieces, language=self.language)):
            text = _WHISPER_MARKER.sub("", t.raw).strip() if t.raw else t.text.strip()
            texts[i] = f"{texts[i]} {text}".strip()
        return texts


def load_asr(name: str = WHISPER_D, device: str | None = None, language: str = "en") -> BackendASR:
    """"pocketsphinx", or a Whisper model (local directory or hub id)."""
    if name == "pocketsphinx":
        if language != "en":
            raise ValueError("pocketsphinx only ships an English model")
        return BackendASR(load_backend("pocketsphinx", {}, "cpu"), language)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend = load_backend("hf-whisper", {"model": name, "batch_size": 16}, str(device))
    except ModelNotFound as err:
        raise ModelNotFound(f"{err}; for the evaluation: pass a local directory holding a transformers "
                            "Whisper checkpoint (e.g. a download of jordand/whisper-d-v1a) as --asr, "
                            "or --asr pocketsphinx") from err
    # WhisperD's speaker tags must not be suppressed; language and task come from generate().
    backend.model.generation_config.suppress_tokens = None
    backend.model.generation_config.forced_decoder_ids = None
    return BackendASR(backend, language)
