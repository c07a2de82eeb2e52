"""PocketSphinx: the embedded offline default (US-English acoustic model, trigram LM and
dictionary ship inside the pip package). Weak but real: about half the words of clean read
speech, RTF ~0.4 on one core. English only; items are decoded one by one.

Confidence = mean posterior probability of the recognised words (silences and fillers left
out), from the decoder's word lattice. 0..1.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.audio import ANALYSIS_SR
from pipeline.backends.asr.base import Transcript, as_float32
from pipeline.backends.hub import is_local, local_path

_ALT = re.compile(r"\(\d+\)$")  # "the(2)": pronunciation variants in word segments


class PocketSphinxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    hmm: str | None = Field(None, description="acoustic model directory (default: the package's en-us)")
    lm: str | None = Field(None, description="language model file (default: the package's en-us.lm.bin)")
    dictionary: str | None = Field(None, description="pronunciation dictionary (default: cmudict-en-us.dict)")


class PocketSphinxBackend:
    name = "pocketsphinx"
    Options = PocketSphinxOptions
    max_seconds = 60.0  # no model window; bounds the search per item
    can_identify_language = False
    word_timestamps = False

    def __init__(self, options: PocketSphinxOptions, device: str = "cpu", num_threads: int = 1):
        from pocketsphinx import Decoder

        kw = {}
        for key, arg in (("hmm", "hmm"), ("lm", "lm"), ("dictionary", "dict")):
            value = getattr(options, key)
            if value is None:
                continue
            if not is_local(value):
                raise FileNotFoundError(f"pocketsphinx: {key} {value!r} does not exist "
                                        f"(set stages.asr.pocketsphinx.{key} to an existing path or leave it out)")
            kw[arg] = local_path(value)
        self.decoder = Decoder(samprate=ANALYSIS_SR, loglevel="FATAL", **kw)

    def transcribe(self, audios: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        return [self._one(as_float32(a)) for a in audios]

    def _one(self, x: np.ndarray) -> Transcript:
        pcm = (np.clip(x, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        d = self.decoder
        # The feature front end carries its cepstral-mean estimate from one utterance to the next:
        # without a reset a clip's words and confidence would depend on the clips before it.
        d.reinit_feat(d.config)
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if not text:
            return Transcript("", None, "")
        probs = [min(1.0, max(0.0, s.prob)) for s in d.seg()
                 if not _is_filler(_ALT.sub("", s.word))]
        return Transcript(text, float(np.mean(probs)) if probs else None, text)

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        raise NotImplementedError("pocketsphinx has no language identification")


def _is_filler(word: str) -> bool:
    return word in ("<s>", "</s>", "<sil>") or (word.startswith("[") and word.endswith("]")) or word.startswith("++")
