"""Dialogue classifiers: the registry (the protocol and the prompt and answer handling that the LLM
backends share are in ``base.py``).

A backend turns recording rows (with diarization ``turns`` and ASR ``utterances``) into one
``Verdict`` per row: a score in 0..1 (the probability that the recording is a two-speaker
dialogue, as the backend sees it), the raw answer, and an error when the answer is unusable.

The transcript is untrusted data (it is whatever was said in the audio, or whatever the ASR
hallucinated). It goes into the user message between ``<transcript>`` tags, one
``SPEAKER_00: ...`` line per turn; the instructions live only in the system message. Before it is
shown, every transcript string is neutralised: ``<`` and ``>`` become ``‹`` and ``›`` (so no tag can
be closed or opened from inside, and no ``<|im_end|>``-style control token can be spelled), control
characters and line breaks become spaces (a turn cannot start a line of its own), and the
tokenizer's special tokens are removed. Speaker labels are renamed ``SPEAKER_00``, ``SPEAKER_01``...
in order of appearance, so no label text from upstream reaches the prompt either.
"""

from __future__ import annotations

from pipeline.backends import Registry

BACKENDS = Registry("classification", {
    "heuristic": "pipeline.backends.llm.heuristic:HeuristicClassifier",
    "transformers": "pipeline.backends.llm.transformers:TransformersClassifier",
    "vllm": "pipeline.backends.llm.vllm:VllmClassifier",
    "ray-llm": "pipeline.backends.llm.ray_llm:RayLlmClassifier",
})
