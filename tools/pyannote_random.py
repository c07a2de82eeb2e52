"""A pyannote pipeline directory with random weights, in the layout of the hub repository: for
tests and speed benchmarks on machines without hub access (random weights diarize nothing
meaningful). ``pipeline.backends.diarization.pyannote`` loads it like a downloaded copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
