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

from pipeline.audio import read_span
from pipeline.backends.diarization import Diarization, Turn
from pipeline.backends.hub import is_local, local_path, model_not_found

SR = 16000
# Before pyannote.audio is first imported (it fixes the default then): no usage telemetry from
# pipeline workers unless the user asked for it.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")


class PyannoteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("pyannote/speaker-diarization-community-1",
                       description="hub id, or a trusted local pipeline directory (config.yaml + segmentation/ embedding/ plda/)")
    token_env: str = Field("HF_TOKEN", description="environment variable that holds the hub token")
    cache_dir: str | None = Field(None, description="hub download cache (default: the huggingface_hub cache)")
    batch_size: int = Field(32, ge=1, description="segmentation and embedding batch size")


def load_pipeline(settings: PyannoteSettings):
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


def annotation_turns(annotation) -> list[Turn]:
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
    def __init__(self, settings: PyannoteSettings | None = None, device: str = "cpu", num_threads: int = 1):
        import torch

        self.s = settings or PyannoteSettings()
        self.num_threads = num_threads
        self.torch = torch
        self.pipeline = load_pipeline(self.s)
        self.pipeline.to(torch.device(device))

    def diarize(self, audio_path: str, speech: list[tuple[float, float]], duration: float,
                min_speakers: int = 1, max_speakers: int | None = None) -> Diarization:
        wav, sr = read_span(audio_path)
        if sr != SR:
            raise ValueError(f"{audio_path}: diarization needs the 16 kHz analysis copy (got {sr} Hz)")
        waveform = self.torch.from_numpy(np.ascontiguousarray(wav))[None]
        # numpy/scipy (VBx clustering) get the worker's thread share too (see embedded.py).
        with self.torch.inference_mode(), threadpool_limits(self.num_threads):
            output = self.pipeline({"waveform": waveform, "sample_rate": SR, "uri": Path(audio_path).stem},
                                   min_speakers=min_speakers, max_speakers=max_speakers)
        return output_to_diarization(output)


# ---------------------------------------------------------------------------------------------
# A pipeline directory with random weights, in the layout of the hub repository: for tests and
# speed benchmarks on machines without hub access (random weights diarize nothing meaningful).

SIZES = {
    # PyanNet as in pyannote/segmentation-3.0; WeSpeaker ResNet34 as in community-1.
    "full": dict(lstm={"hidden_size": 128, "num_layers": 4, "bidirectional": True, "monolithic": True,
                       "dropout": 0.0},
                 linear={"hidden_size": 128, "num_layers": 2}, num_mel_bins=80, chunk=10.0, step=0.1,
                 local_speakers=3),
    "tiny": dict(lstm={"hidden_size": 16, "num_layers": 1, "bidirectional": True, "monolithic": True,
                       "dropout": 0.0},
                 linear={"hidden_size": 16, "num_layers": 1}, num_mel_bins=8, chunk=2.0, step=0.5,
                 local_speakers=2),
}


def _save_checkpoint(model, path: Path) -> None:
    import lightning
    import torch

    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(ckpt)  # adds pyannote's versions / architecture / specifications
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)


def write_random_pipeline(out: str | Path, size: str = "tiny", seed: int = 0, speech_bias: float = 3.0) -> Path:
    """Write ``out/{config.yaml, segmentation/, embedding/, plda/}`` with random weights.

    ``speech_bias`` lifts the segmentation logits of the classes "speaker 1", "speaker 2" and
    "speakers 1+2" so that the random model labels most frames as speech, some of it
    overlapped, instead of silence: the whole pipeline (embeddings, clustering, reconstruction,
    overlaps) then has something to work on."""
    import torch
    import yaml
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34
    from pyannote.audio.models.segmentation import PyanNet

    cfg = SIZES[size]
    out = Path(out)
    torch.manual_seed(seed)
    seg = PyanNet(lstm=cfg["lstm"], linear=cfg["linear"])
    seg.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=cfg["chunk"],
        min_duration=cfg["chunk"], warm_up=(0.0, 0.0),
        classes=[f"speaker#{i + 1}" for i in range(cfg["local_speakers"])],
        powerset_max_classes=2, permutation_invariant=True)
    seg.build()
    with torch.no_grad():
        # Powerset classes: {}, {1}, {2}, ..., {n}, {1,2}, ...
        n = cfg["local_speakers"]
        seg.classifier.bias[[1, 2, n + 1]] += speech_bias
    _save_checkpoint(seg, out / "segmentation" / "pytorch_model.bin")

    emb = WeSpeakerResNet34(num_mel_bins=cfg["num_mel_bins"])
    emb.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK,
                                        duration=cfg["chunk"], min_duration=0.5)
    _save_checkpoint(emb, out / "embedding" / "pytorch_model.bin")

    # PLDA from random arrays: centring/whitening/LDA transform, then a PLDA model (see
    # pyannote.audio.utils.vbx.vbx_setup for the fields).
    rng = np.random.default_rng(seed)
    dim, lda_dim = emb.dimension, 128
    lda = np.linalg.qr(rng.standard_normal((dim, lda_dim)))[0]
    (out / "plda").mkdir(parents=True, exist_ok=True)
    np.savez(out / "plda" / "xvec_transform.npz", mean1=rng.standard_normal(dim) * 0.01,
             mean2=rng.standard_normal(lda_dim) * 0.01, lda=lda)
    np.savez(out / "plda" / "plda.npz", mu=np.zeros(lda_dim), tr=np.eye(lda_dim),
             psi=np.sort(rng.uniform(0.5, 5.0, lda_dim))[::-1].copy())

    import pyannote.audio

    config = {
        "dependencies": {"pyannote.audio": pyannote.audio.__version__},
        "pipeline": {
            "name": "pyannote.audio.pipelines.SpeakerDiarization",
            "params": {"segmentation": "$model/segmentation", "embedding": "$model/embedding",
                       "plda": "$model/plda", "clustering": "VBxClustering", "segmentation_step": cfg["step"],
                       "embedding_exclude_overlap": True, "segmentation_batch_size": 32,
                       "embedding_batch_size": 32},
        },
        "params": {"segmentation": {"min_duration_off": 0.0},
                   "clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8}},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out
