"""openai-whisper: batched 30 s decoding and language identification.

``model`` is one of whisper's names (``large-v3``, ``small``, ... — taken from whisper's download
cache, ``~/.cache/whisper``, or downloaded) or a local checkpoint file holding
``{"dims": ..., "model_state_dict": ...}``.

Confidence = exp(avg_logprob): whisper's mean log-probability of the decoded tokens (end-of-text
included), i.e. the geometric-mean token probability, 0..1.
"""

from __future__ import annotations

import os

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr.base import Transcript, as_float32, batches
from pipeline.backends.hub import is_local, local_path, model_not_found


class WhisperOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("large-v3", description="whisper model name or local checkpoint file (.pt)")
    batch_size: int = Field(8, ge=1, description="30 s windows per model call")
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding")
    fp16: bool = Field(True, description="half precision on GPU (CPU always runs float32)")
    max_new_tokens: int | None = Field(None, ge=1, description="decoded tokens per window (default: whisper's 224)")


class WhisperBackend:
    name = "whisper"
    Options = WhisperOptions
    max_seconds = 30.0
    can_identify_language = True
    word_timestamps = False

    def __init__(self, options: WhisperOptions, device: str = "cpu", num_threads: int = 1):
        from whisper.tokenizer import get_tokenizer

        self.options = options
        self.device = device
        self.model = _load(options.model, device)
        self.fp16 = options.fp16 and device == "cuda"
        if self.fp16:
            self.model.half()
        self.tokenizer = get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages, task="transcribe")

    def _mel(self, audios: list[np.ndarray]):
        import torch
        import whisper

        mels = []
        for a in audios:
            x = as_float32(a)
            if len(x) > self.max_seconds * ANALYSIS_SR + 1:
                raise ValueError(f"whisper: {len(x) / ANALYSIS_SR:.1f} s item exceeds its 30 s window")
            x = whisper.pad_or_trim(torch.from_numpy(x).to(self.device))
            mels.append(whisper.log_mel_spectrogram(x, self.model.dims.n_mels))
        mel = torch.stack(mels)
        return mel.half() if self.fp16 else mel

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        import torch

        if not self.model.is_multilingual:
            raise NotImplementedError(f"whisper model {self.options.model!r} is English-only: it has no language tokens")
        out: list[dict[str, float]] = []
        with torch.no_grad():
            for idx in batches(len(audios), self.options.batch_size):
                _, probs = self.model.detect_language(self._mel([audios[i] for i in idx]), self.tokenizer)
                out += probs
        return out

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        import torch
        import whisper

        if language is not None and not self.model.is_multilingual and language != "en":
            language = "en"  # English-only checkpoints decode everything as English
        opts = whisper.DecodingOptions(
            task="transcribe", language=language, without_timestamps=True, fp16=self.fp16,
            beam_size=self.options.beam_size if self.options.beam_size > 1 else None,
            sample_len=self.options.max_new_tokens)
        eot = self.tokenizer.eot
        out: list[Transcript] = []
        with torch.no_grad():
            for idx in batches(len(audios), self.options.batch_size):
                for r in whisper.decode(self.model, self._mel([audios[i] for i in idx]), opts):
                    # Special tokens (all ids >= end-of-text) never belong in the clean text.
                    text = self.tokenizer.decode([t for t in r.tokens if t < eot]).strip()
                    conf = float(np.exp(r.avg_logprob)) if np.isfinite(r.avg_logprob) else None
                    out.append(Transcript(text, conf, self.tokenizer.decode_with_timestamps(list(r.tokens))))
        return out


def _load(ref: str, device: str):
    import whisper

    how = "set stages.asr.whisper.model to a local checkpoint file (.pt)"
    if is_local(ref):
        path = local_path(ref)
        if os.path.isdir(path):
            raise ValueError(f"whisper: {path} is a directory; openai-whisper loads a checkpoint file (.pt)")
        try:
            return whisper.load_model(path, device=device)
        except Exception as e:
            raise ValueError(f"whisper: cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    if ref not in whisper.available_models():
        raise model_not_found(ref, "openai-whisper", f"{how} (or use one of whisper's names: "
                              f"{', '.join(whisper.available_models())})")
    try:  # found in whisper's download cache, or downloaded
        return whisper.load_model(ref, device=device)
    except Exception as e:
        raise model_not_found(ref, "openai-whisper", how, e) from e
