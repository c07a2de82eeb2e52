"""pyannote.audio 4.x speaker diarization (default: pyannote/speaker-diarization-community-1).

The pipeline comes from the hub (gated: accept its conditions and put a token in the
environment variable named by ``token_env``) or, on offline clusters, from a local directory laid
out like the hub repository::

    <dir>/config.yaml                    pipeline class and parameters; "$model/<sub>" entries
                                         point at the sub-folders below
    <dir>/segmentation/pytorch_model.bin PyanNet segmentation checkpoint
    <dir>/embedding/pytorch_model.bin    WeSpeaker ResNet34 embedding checkpoint
    <dir>/plda/xvec_transform.npz, plda.npz

A pipeline config is code: it names the Python classes to instantiate and the checkpoints are
pickles. Load only directories you trust (your own copy of the hub repository).

pyannote.audio sends usage telemetry to its authors by default; this backend turns it off
unless ``PYANNOTE_METRICS_ENABLED`` is already set.

Audio goes to the pipeline in memory (the 16 kHz analysis copy, read whole), so the pipeline
never touches torchaudio's file I/O. The pipeline runs its own speech detection: the VAD spans
are not used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from pipeline.audio import ANALYSIS_SR, read_span
from pipeline.backends.diarization.base import Diarization, TurnTuple
from pipeline.backends.hub import is_local, local_path, model_not_found

# Before pyannote.audio is first imported (it fixes the default then): no usage telemetry from
# pipeline workers unless the user asked for it.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


class PyannoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("pyannote/speaker-diarization-community-1",
                       description="hub id, or a trusted local pipeline directory (config.yaml + segmentation/ embedding/ plda/)")
    token_env: str = Field("HF_TOKEN", description="environment variable that holds the hub token")
    cache_dir: str | None = Field(None, description="hub download cache (default: the huggingface_hub cache)")
    batch_size: int = Field(32, ge=1, description="segmentation and embedding batch size")


def load_pipeline(settings: PyannoteOptions):
    """The pyannote Pipeline named by ``settings.model``, or a clear error."""
    try:
        from pyannote.audio import Pipeline
    except ImportError as e:
        raise ImportError(f"the pyannote diarization backend needs pyannote.audio>=4: "
                          f"pip install -c constraints.txt -e '.[pyannote]' ({e})") from e
    ref = settings.model
    if is_local(ref):
        path = Path(local_path(ref))
        config = path / "config.yaml" if path.is_dir() else path
        if not config.is_file():
            raise FileNotFoundError(f"{path}: not a pyannote pipeline directory (no config.yaml)")
        try:
            pipeline = Pipeline.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any failure here is a broken directory
            raise ValueError(f"{config}: cannot load the pyannote pipeline: {type(e).__name__}: {e}") from e
    else:
        token = os.environ.get(settings.token_env) or None
        try:
            pipeline = Pipeline.from_pretrained(ref, token=token, cache_dir=settings.cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, gated, unknown repo: one message
            raise model_not_found(ref, "pyannote diarization", _HOW.format(env=settings.token_env), e) from e
        if pipeline is None:  # pyannote's answer to some hub errors
            raise model_not_found(ref, "pyannote diarization", _HOW.format(env=settings.token_env))
    for attr in ("segmentation_batch_size", "embedding_batch_size"):
        if hasattr(pipeline, attr):
            setattr(pipeline, attr, settings.batch_size)
    return pipeline


_HOW = ("set stages.diarization.pyannote.model to a local pipeline directory (a copy of the hub "
        "repository), or accept the model's conditions on the hub and put a token in ${env}")


def annotation_turns(annotation) -> list[TurnTuple]:
    return [(float(seg.start), float(seg.end), str(label))
            for seg, _, label in annotation.itertracks(yield_label=True)]


def output_to_diarization(output) -> Diarization:
    """pyannote 4 returns a DiarizeOutput (turns + exclusive turns); legacy pipelines and 3.x
    return an Annotation (turns only: the exclusive turns are then derived from them)."""
    if hasattr(output, "speaker_diarization"):
        excl = getattr(output, "exclusive_speaker_diarization", None)
        return Diarization(annotation_turns(output.speaker_diarization),
                           annotation_turns(excl) if excl is not None else None)
    if hasattr(output, "itertracks"):
        return Diarization(annotation_turns(output))
    raise TypeError(f"unexpected pyannote pipeline output {type(output).__name__}")


class PyannoteDiarizer:
    Options = PyannoteOptions

    def __init__(self, options: PyannoteOptions | None = None, device: str = "cpu", num_threads: int = 1):
        import torch

        self.s = options or PyannoteOptions()
        self.num_threads = num_threads
        self.torch = torch
        self.pipeline = load_pipeline(self.s)
        self.pipeline.to(torch.device(device))

    def diarize(self, audio_path: str, speech: list[tuple[float, float]], duration: float,
                min_speakers: int = 1, max_speakers: int | None = None) -> Diarization:
        wav, sr = read_span(audio_path)
        if sr != ANALYSIS_SR:
            raise ValueError(f"{audio_path}: diarization needs the 16 kHz analysis copy (got {sr} Hz)")
        waveform = self.torch.from_numpy(np.ascontiguousarray(wav))[None]
        # numpy/scipy (VBx clustering) get the worker's thread share too (see embedded.py).
        with self.torch.inference_mode(), threadpool_limits(self.num_threads):
            output = self.pipeline({"waveform": waveform, "sample_rate": ANALYSIS_SR, "uri": Path(audio_path).stem},
                                   min_speakers=min_speakers, max_speakers=max_speakers)
        return output_to_diarization(output)
