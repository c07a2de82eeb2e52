"""Dialogue TTS metrics of the ZipVoice-Dialog paper (section 6.2): WER, cpWER, cpSIM, UTMOS, RTF.

Text normalisation and error pooling follow the reference evaluation: tags and bracketed spans are
deleted, punctuation (ASCII and CJK, the ASCII apostrophe excepted) removed, whitespace collapsed,
English lowercased and Chinese split into characters; corpus WER = sum(S + D + I) / reference words.
"""

from __future__ import annotations

import logging
import os
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.audio import ANALYSIS_SR

log = logging.getLogger(__name__)

CPWER_MAX_SECONDS = 30.0

# CJK and full-width punctuation (the set the reference takes from zhon.hanzi.punctuation)
CJK_PUNCTUATION = (
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､\u3000、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏﹑﹔·！？｡。"
)
_DELETE_CHARS = {ord(c): None for c in set(string.punctuation + CJK_PUNCTUATION) - {"'"}}
_BRACKETED = re.compile(r"\[.*?\]|<.*?>|\(.*?\)")
_SPEAKER_TAG = re.compile(r"\[S\d\]")


def normalize_text(text: str, lang: str) -> str:
    """Normalise a transcript for WER: see the module docstring. ``lang`` is "en" or "zh"."""
    text = _BRACKETED.sub("", text)
    text = text.translate(_DELETE_CHARS)
    text = re.sub(r"\s+", " ", text).strip()
    if lang == "en":
        return text.lower()
    if lang == "zh":
        return " ".join(c for c in text if not c.isspace())
    raise ValueError(f"unsupported language {lang!r} (expected 'en' or 'zh')")


@dataclass
class ErrorCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Percent; inf when errors exist over an empty reference."""
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return 100.0 * self.errors / self.ref_words

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.ref_words + other.ref_words,
        )


def word_errors(ref: str, hyp: str) -> ErrorCounts:
    """Levenshtein S/D/I between two already-normalised, space-separated word strings (jiwer)."""
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref_words:
        return ErrorCounts(insertions=len(hyp_words))
    if not hyp_words:
        return ErrorCounts(deletions=len(ref_words), ref_words=len(ref_words))
    import jiwer

    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, len(ref_words))


def wer_counts(ref: str, hyp: str, lang: str = "en") -> ErrorCounts:
    """Speaker-agnostic errors of one utterance (tags removed by the normalisation)."""
    return word_errors(normalize_text(ref, lang), normalize_text(hyp, lang))


def split_dialogue(text: str) -> tuple[str, str]:
    """Split at every [S<digit>]: even-indexed pieces (the lead before the first tag, then turns
    2, 4, ...) form one stream, odd-indexed pieces (turns 1, 3, ...) the other."""
    pieces = [p.strip() for p in _SPEAKER_TAG.split(text)]
    return " ".join(pieces[0::2]), " ".join(pieces[1::2])


def cpwer_counts(ref: str, hyp: str, lang: str = "en") -> ErrorCounts:
    """Concatenated minimum-permutation errors of one dialogue (two speakers)."""
    ref_a, ref_b = (normalize_text(t, lang) for t in split_dialogue(ref))
    hyp_a, hyp_b = (normalize_text(t, lang) for t in split_dialogue(hyp))
    reference = f"{ref_a} {ref_b}"
    same = word_errors(reference, f"{hyp_a} {hyp_b}")
    swapped = word_errors(reference, f"{hyp_b} {hyp_a}")
    return same if same.errors < swapped.errors else swapped


def _pooled(counts: Callable[[str, str, str], ErrorCounts], refs: Sequence[str], hyps: Sequence[str],
            lang: str) -> ErrorCounts:
    _check_pairs(refs, hyps)
    total = ErrorCounts()
    for r, h in zip(refs, hyps):
        total = total + counts(r, h, lang)
    return total


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], lang: str = "en") -> ErrorCounts:
    """Pooled WER over a corpus: ``.wer`` is sum(S + D + I) / sum(ref words) in percent."""
    return _pooled(wer_counts, refs, hyps, lang)


def corpus_cpwer(refs: Sequence[str], hyps: Sequence[str], lang: str = "en") -> ErrorCounts:
    return _pooled(cpwer_counts, refs, hyps, lang)


def _check_pairs(refs, hyps):
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")


# --------------------------------------------------------------------------- cpSIM


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def cpsim_from_embeddings(gen: Sequence[np.ndarray], prompt: Sequence[np.ndarray]) -> float:
    """Max over the two speaker assignments of the mean cosine similarity (generated vs prompt)."""
    if len(gen) != 2 or len(prompt) != 2:
        raise ValueError("cpSIM needs exactly two generated and two prompt speaker embeddings")
    direct = (cosine(gen[0], prompt[0]) + cosine(gen[1], prompt[1])) / 2
    crossed = (cosine(gen[0], prompt[1]) + cosine(gen[1], prompt[0])) / 2
    return max(direct, crossed)


def speaker_streams(
    wave: np.ndarray, segments: Sequence[tuple[float, float, str]], sampling_rate: int = ANALYSIS_SR
) -> list[np.ndarray] | None:
    """Concatenate the audio of the two most talkative diarized speakers; None if fewer than two."""
    per_speaker: dict[str, list[np.ndarray]] = {}
    for start, end, label in segments:
        chunk = wave[int(start * sampling_rate) : int(end * sampling_rate)]
        if len(chunk):
            per_speaker.setdefault(label, []).append(chunk)
    if len(per_speaker) < 2:
        return None
    ranked = sorted(per_speaker.values(), key=lambda chunks: -sum(len(c) for c in chunks))
    return [np.concatenate(chunks) for chunks in ranked[:2]]


def dialogue_embeddings(
    wave: np.ndarray,
    embed: Callable[[np.ndarray], np.ndarray],
    diarize: Callable[[np.ndarray], Sequence[tuple[float, float, str]]],
    sampling_rate: int = ANALYSIS_SR,
    max_seconds: float = 120.0,
) -> list[np.ndarray]:
    """Two speaker embeddings of a dialogue: diarize, then embed each speaker's concatenated speech.

    As in the reference, the whole audio stands for both speakers when diarization does not find
    two of them or embedding a stream fails (too short, for instance).
    """
    wave = np.asarray(wave, dtype=np.float32)[: int(max_seconds * sampling_rate)]
    streams = speaker_streams(wave, diarize(wave), sampling_rate)
    if streams is not None:
        try:
            return [embed(s) for s in streams]
        except Exception as err:
            log.debug("embedding a diarized stream failed (%s): using the whole audio", err)
    whole = embed(wave)
    return [whole, whole]


def cpsim(
    gen_wave: np.ndarray,
    prompt_waves: Sequence[np.ndarray],
    embed: Callable[[np.ndarray], np.ndarray],
    diarize: Callable[[np.ndarray], Sequence[tuple[float, float, str]]],
    sampling_rate: int = ANALYSIS_SR,
) -> float:
    """cpSIM of one generated dialogue against two single-speaker prompts (mono audio).

    ``diarize`` returns (start_s, end_s, speaker) segments; ``embed`` maps audio to a speaker embedding.
    """
    if len(prompt_waves) != 2:
        raise ValueError("cpSIM needs two prompt waveforms (speaker 1, speaker 2)")
    gen = dialogue_embeddings(gen_wave, embed, diarize, sampling_rate)
    prompt = [embed(np.asarray(p, dtype=np.float32)) for p in prompt_waves]
    return cpsim_from_embeddings(gen, prompt)


# --------------------------------------------------------------------------- UTMOS


class MetricUnavailable(RuntimeError):
    """A metric whose model is not present on this machine."""


class UTMOS:
    """UTMOS22 predictor from a local TorchScript file: ``forward(wave (1, N) at 16 kHz[, sr]) -> score``.

    The reference ships ``utmos22_strong_step7459_v1.pt`` as a plain state dict of its own model
    class; export it (or any UTMOS22 model) to TorchScript to use it here.
    """

    def __init__(self, path: str | os.PathLike | None):
        import torch

        if path is None:
            raise MetricUnavailable("UTMOS is unavailable: pass the path of a UTMOS22 TorchScript model (--utmos-model)")
        path = Path(path)
        if not path.is_file():
            raise MetricUnavailable(f"UTMOS is unavailable: model file not found: {path}")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:
            raise MetricUnavailable(
                f"UTMOS is unavailable: {path} is not a TorchScript module ({type(err).__name__}). "
                "A state-dict checkpoint needs its model class: export it with torch.jit.script/trace first."
            ) from err
        args = [a.name for a in self.model.forward.schema.arguments if a.name != "self"]
        self._takes_sr = len(args) >= 2

    def score(self, wave: np.ndarray, sampling_rate: int = ANALYSIS_SR) -> float:
        import torch

        if sampling_rate != ANALYSIS_SR:
            from model.features import resample

            wave = resample(np.asarray(wave, dtype=np.float32), sampling_rate, ANALYSIS_SR)
        x = torch.from_numpy(np.asarray(wave, dtype=np.float32)).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(x, ANALYSIS_SR) if self._takes_sr else self.model(x)
        return float(out.reshape(-1)[0])


# --------------------------------------------------------------------------- RTF


def rtf(processing_seconds: float, audio_seconds: float) -> float:
    """Real-time factor: compute time / duration of the audio produced."""
    if audio_seconds <= 0:
        raise ValueError("RTF needs a positive audio duration")
    return processing_seconds / audio_seconds


class RTFMeter:
    """Accumulates (compute time, audio duration) pairs; ``.value`` is the pooled RTF.

    ``with meter.measure() as m: wave = synthesize(...); m.audio_seconds = len(wave) / sr``
    """

    def __init__(self):
        self.processing_seconds = 0.0
        self.audio_seconds = 0.0

    def add(self, processing_seconds: float, audio_seconds: float) -> None:
        self.processing_seconds += processing_seconds
        self.audio_seconds += audio_seconds

    def measure(self) -> "_Measurement":
        return _Measurement(self)

    @property
    def value(self) -> float:
        return rtf(self.processing_seconds, self.audio_seconds)


class _Measurement:
    def __init__(self, meter: RTFMeter):
        self.meter = meter
        self.audio_seconds = None

    def __enter__(self):
        _sync_accelerator()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        _sync_accelerator()
        if exc_type is None:
            if self.audio_seconds is None:
                raise ValueError("set .audio_seconds inside the RTF measurement block")
            self.meter.add(time.perf_counter() - self._start, self.audio_seconds)
        return False


def _sync_accelerator():
    # GPU kernels run asynchronously: without a sync the timer would stop before the work ends.
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
