"""Objective metrics of the ZipVoice-Dialog benchmark (paper section 6.2): WER, cpWER, cpSIM, UTMOS, RTF.

Run ``python -m model.eval --help`` for the command-line scorer. Heavy models (ASR, speaker
embedders) live in ``model.eval.asr`` and ``model.eval.speaker`` and load only when asked for.
"""

from model.eval.metrics import (
    UTMOS,
    ErrorCounts,
    MetricUnavailable,
    RTFMeter,
    corpus_cpwer,
    corpus_wer,
    cpsim,
    cpsim_from_embeddings,
    cpwer_counts,
    dialogue_embeddings,
    normalize_text,
    rtf,
    split_dialogue,
    wer_counts,
)

__all__ = [
    "UTMOS",
    "ErrorCounts",
    "MetricUnavailable",
    "RTFMeter",
    "corpus_cpwer",
    "corpus_wer",
    "cpsim",
    "cpsim_from_embeddings",
    "cpwer_counts",
    "dialogue_embeddings",
    "normalize_text",
    "rtf",
    "split_dialogue",
    "wer_counts",
]
