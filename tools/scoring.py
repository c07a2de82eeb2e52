"""Scores that tests and benchmarks compute against the known truth of generated audio."""

from __future__ import annotations


def diarization_error(reference: list[tuple[float, float, str]], hypothesis: list[tuple[float, float, str]],
                      duration: float) -> dict[str, float]:
    """DER with pyannote.metrics (no collar, overlapped speech scored) and its parts, as fractions
    of the reference speech: ``der``, ``missed``, ``false_alarm``, ``confusion``."""
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = Annotation(), Annotation()
    for i, (a, b, spk) in enumerate(reference):
        ref[Segment(a, b), i] = spk
    for i, (a, b, spk) in enumerate(hypothesis):
        hyp[Segment(a, b), i] = spk
    c = DiarizationErrorRate(collar=0.0, skip_overlap=False)(
        ref, hyp, uem=Timeline([Segment(0, duration)]), detailed=True)
    total = c["total"] or 1.0
    return {"der": c["diarization error rate"], "missed": c["missed detection"] / total,
            "false_alarm": c["false alarm"] / total, "confusion": c["confusion"] / total}
