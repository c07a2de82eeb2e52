"""Speaker diarization backends: who spoke when in one recording.

A backend is a class built once per worker from its options section and the stage context::

    diarizer = BACKENDS.build("embedded", options, device="cpu", num_threads=1)
    result = diarizer.diarize(audio_path, speech=[(0.5, 3.2), ...], duration=41.0,
                              min_speakers=1, max_speakers=4)

``audio_path`` is the 16 kHz mono analysis copy, ``speech`` the VAD spans in seconds. A backend
returns a :class:`Diarization`: speaker turns that may overlap and, when it knows better than the
generic rule here, its own exclusive (non-overlapping) turns. Everything derived from the turns
(overlap regions, durations, label order) is computed here, identically for every backend.
"""

from __future__ import annotations

from pipeline.backends import Registry
from pipeline.backends.diarization.base import (Diarization, Diarizer, TurnTuple, exclusive_turns, merge_turns,
                                                overlap_regions, relabel, row_fields, union_duration)

__all__ = ["BACKENDS", "Diarization", "Diarizer", "TurnTuple", "exclusive_turns", "load_backend",
           "merge_turns", "overlap_regions", "relabel", "row_fields", "union_duration"]

BACKENDS = Registry("diarization", {
    "embedded": "pipeline.backends.diarization.embedded:EmbeddedDiarizer",
    "pyannote": "pipeline.backends.diarization.pyannote:PyannoteDiarizer",
    "powerset": "pipeline.backends.diarization.powerset:PowersetDiarizer",
})


def load_backend(name: str) -> type:
    """The class of backend ``name`` (build it with ``BACKENDS.build(name, options, ...)``)."""
    return BACKENDS.get(name)
