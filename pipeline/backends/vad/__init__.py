"""Voice activity detection backends: speech probability per short window of a recording.

A backend is built once per worker, ``BACKENDS.build(name, options, device, num_threads)``, and
has ``hop`` (seconds between probabilities) and::

    probabilities(paths: list[str]) -> list[np.ndarray]   # one array per 16 kHz mono file

The stage turns the probabilities into speech spans (thresholds, padding) the same way for
every backend.
"""

from __future__ import annotations

from pipeline.backends import Registry

BACKENDS = Registry("VAD", {
    "silero": "pipeline.backends.vad.silero:SileroVad",
})
