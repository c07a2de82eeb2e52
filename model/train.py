"""Train ZipVoice (monologue), ZipVoice-Dialog or ZipVoice-Dialog-Stereo.

    python -m model.train --config configs/train_dialog.yaml [--set train.num_iters=1000 ...]
    torchrun --nproc_per_node 8 -m model.train --config configs/train_dialog.yaml

Stages (fact sheet 5, paper 4.1 and A.1):
  * monologue: plain ZipVoice, random-span prompt mask; from scratch or a ZipVoice checkpoint;
  * dialog: curriculum stage 2: ZipVoice-Dialog initialised from a ZipVoice checkpoint (the
    ZipVoice vocabulary + 28 tokens of the dialog tokens.txt), or `finetune: true` from a
    ZipVoice-Dialog checkpoint; suffix prompt mask;
  * stereo: ZipVoice-Dialog-Stereo initialised from ZipVoice-Dialog; even batches train the mono
    head on the downmix, odd batches the stereo head with the speaker-exclusive loss;
  * distill: the few-step variant (`model.distill`) of the model in init_checkpoint: stage "first"
    distils a ZipVoice-Dialog(-Stereo) teacher run with CFG, stage "second" continues from the
    stage-1 result against an EMA of itself (the reference's two-stage Distill recipe).

The experiment folder holds model.json + tokens.txt (written at the start), `checkpoint-N.pt`
every `save_every_n` updates (everything needed to resume exactly: model, optimizer, scheduler,
grad scaler, sampler position, RNG states, model_avg, counters), `model.pt` = {"model": weights}
(the latest weights; at the end the average over the last `export_avg` checkpoint intervals), so
the folder is directly usable by `python -m model.infer --checkpoint DIR`; `log/train.log`,
`log/metrics.jsonl` and `tensorboard/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.checkpoint import (
    FEATURE_CONFIG,
    build_model,
    detect_variant,
    init_dialog_from_zipvoice,
    init_stereo_from_dialog,
    load_state_dict,
    model_state_dict,
    read_model_config,
)
from model.data import (
    BucketBatchSampler,
    DataConfig,
    TTSDataset,
    describe,
    dev_batches,
    load_datasets,
    make_loader,
)
from model.optim import Eden, FixedLR, ScaledAdam, grad_scale_update
from model.tokenizer import get_tokenizer, read_tokens, write_tokens
from model.zipformer import Regularisation
from model.zipvoice import (
    DISTILL_SUFFIX,
    condition_time_mask,
    condition_time_mask_suffix,
    split_stereo_training_features,
)
from pipeline import clitools
from pipeline.config import apply_overrides

log = logging.getLogger("model.train")

VARIANTS = {"monologue": "zipvoice", "dialog": "zipvoice_dialog", "stereo": "zipvoice_dialog_stereo"}
STEREO_VARIANTS = ("zipvoice_dialog_stereo", "zipvoice_dialog_stereo" + DISTILL_SUFFIX)
CHECKPOINT_RE = re.compile(r"^(checkpoint|epoch)-(\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    config: str | None = Field(None, description="model.json (default: beside init_checkpoint)")
    token_file: str | None = Field(None, description="tokens.txt of the trained model (default: "
                                   "beside init_checkpoint; required for the dialog curriculum)")
    tokenizer: Literal["dialog", "emilia", "espeak", "simple"] | None = None
    init_checkpoint: str | None = Field(None, description="ZipVoice (dialog curriculum), "
                                        "ZipVoice-Dialog (finetune / stereo) or ZipVoice model.pt")
    finetune: bool = Field(False, description="init_checkpoint is already of the trained variant")
    attention_backend: Literal["explicit", "sdpa"] = "explicit"
    regularisation: dict[str, float] = Field(default_factory=dict,
                                             description="overrides of model.zipformer.Regularisation")

    @field_validator("regularisation")
    @classmethod
    def _known_rates(cls, v):
        known = {f.name for f in dataclasses.fields(Regularisation)}
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"unknown regularisation key(s) {bad}; known: {sorted(known)}")
        return v


class OptimSection(_Strict):
    lr: float = Field(1e-4, gt=0, description="base LR (ScaledAdam: relative to parameter RMS)")
    scheduler: Literal["fixed", "eden"] = "fixed"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clipping_scale: float | None = 2.0
    scalar_lr_scale: float = 0.1
    param_min_rms: float = 1e-5
    param_max_rms: float = 3.0
    scalar_max: float = 10.0
    size_update_period: int = Field(4, ge=1)
    clipping_update_period: int = Field(100, ge=1)
    lr_batches: float = Field(7500, gt=0, description="Eden")
    lr_epochs: float = Field(3.5, gt=0, description="Eden (ignored when lr_hours > 0)")
    lr_hours: float = Field(0, ge=0, description="Eden: decay by hours of audio seen instead of epochs")
    warmup_batches: float = Field(500, ge=0, description="Eden")
    warmup_start: float = Field(0.5, ge=0, le=1, description="Eden")


class TrainSection(_Strict):
    num_iters: int = Field(60000, ge=0, description="updates; 0 = train num_epochs epochs")
    num_epochs: int = Field(11, ge=1)
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    condition_drop_ratio: float = Field(0.2, ge=0, le=1)
    se_loss_weight: float = Field(1.0, ge=0, description="stereo speaker-exclusive loss weight")
    save_every_n: int = Field(5000, ge=1)
    valid_every_n: int | None = Field(None, ge=1, description="default: save_every_n")
    keep_last_k: int = Field(30, ge=1, description="periodic checkpoints kept")
    average_period: int = Field(200, ge=1, description="model_avg update period (updates)")
    export_avg: int = Field(2, ge=0, description="exp/model.pt at the end: average over the last "
                            "N checkpoint intervals (0: the final weights)")
    log_interval: int = Field(50, ge=1)
    tensorboard: bool = True
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads")


class DistillSection(_Strict):
    stage: Literal["first", "second"] = Field(
        "first", description="first: model.init_checkpoint is the teacher (a non-distilled model, "
        "run with CFG); second: it is the stage-1 result, the teacher an EMA of the student")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="stage second: EMA teacher decay")


class TrainConfig(_Strict):
    stage: Literal["monologue", "dialog", "stereo", "distill"]
    exp_dir: str
    resume: bool = Field(True, description="continue from the newest checkpoint in exp_dir")
    model: ModelSection = ModelSection()
    data: DataConfig
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    distill: DistillSection = DistillSection()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> TrainConfig:
    """YAML (or a dict) + `section.key=value` overrides (values parsed as YAML) -> TrainConfig.
    Errors name the file and the dotted key."""
    where = str(path) if path else "config"
    if raw is None:
        if path is None:
            raise ValueError("give a config path or a dict")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from None
    raw = apply_overrides(raw, overrides)  # the pipeline's --set parser: one syntax for both
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{where}: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ValueError("invalid training config:\n  " + "\n  ".join(lines)) from None


# --------------------------------------------------------------------------------------------
# Distributed environment, RNG
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistEnv:
    """torchrun / torch.distributed.run sets WORLD_SIZE, RANK, LOCAL_RANK (also across nodes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    return env


def pick_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{env.local_rank}")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The reference reseeds with seed + epoch - 1 at every epoch start; ranks get their own
    stream (other noise per GPU)."""
    return seed + epoch - 1 + 1_000_003 * rank


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain types (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj, env: DistEnv) -> list:
    if env.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Model set-up
# --------------------------------------------------------------------------------------------


def _beside(path: str | None, name: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    cand = (p if p.is_dir() else p.parent) / name
    return cand if cand.is_file() else None


def _model_path(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        for name in ("model.pt", "model.safetensors"):
            if (p / name).is_file():
                return str(p / name)
        raise FileNotFoundError(f"{p}: no model.pt or model.safetensors in this folder")
    return str(p)


def resolve_model_files(cfg: TrainConfig, resuming: bool) -> tuple[Path, Path]:
    """(model.json, tokens.txt) for the model being trained."""
    exp = Path(cfg.exp_dir)
    m = cfg.model
    config = Path(m.config) if m.config else (exp / "model.json" if resuming else
                                               _beside(m.init_checkpoint, "model.json"))
    if config is None:
        raise ValueError("model.config is not set and no model.json lies beside model.init_checkpoint")
    tokens = Path(m.token_file) if m.token_file else (exp / "tokens.txt" if resuming else None)
    if tokens is None:
        if cfg.stage == "dialog" and not m.finetune:
            raise ValueError("model.token_file must name the ZipVoice-Dialog tokens.txt: the dialog "
                             "vocabulary is the ZipVoice one plus 28 tokens (fact sheet 5.4)")
        tokens = _beside(m.init_checkpoint, "tokens.txt")
        if tokens is None:
            raise ValueError("model.token_file is not set and no tokens.txt lies beside "
                             "model.init_checkpoint")
    return config, tokens


def stage_variant(cfg: TrainConfig, ckpt: dict | None) -> str:
    """The variant trained: fixed per stage, or for distill the *_distill form of the model in
    init_checkpoint (or in the checkpoint resumed from)."""
    if cfg.stage != "distill":
        return VARIANTS[cfg.stage]
    if ckpt is not None:
        return detect_variant(ckpt["model"])
    if cfg.model.init_checkpoint is None:
        raise ValueError("stage 'distill' needs model.init_checkpoint: the teacher (distill.stage "
                         "first) or the stage-1 result (distill.stage second)")
    path = _model_path(cfg.model.init_checkpoint)
    found = detect_variant(load_state_dict(path))
    distilled = found.endswith(DISTILL_SUFFIX)
    if cfg.distill.stage == "first" and distilled:
        raise ValueError(f"{path}: holds a distilled model ({found}); distill stage 'first' needs "
                         "the many-step teacher (set distill.stage=second to continue from it)")
    if cfg.distill.stage == "second" and not distilled:
        raise ValueError(f"{path}: holds {found}, not a distilled model; distill stage 'second' "
                         "starts from the stage-1 result")
    return found if distilled else found + DISTILL_SUFFIX


def build_for_stage(cfg: TrainConfig, model_config: dict, token2id: dict[str, int],
                    variant: str | None = None):
    reg = Regularisation(**cfg.model.regularisation)
    return build_model(variant or VARIANTS[cfg.stage], model_config, token2id, regularisation=reg)


def load_teacher(cfg: TrainConfig, model_config: dict, token2id: dict[str, int], variant: str):
    """Distill stage 'first': the fixed many-step model of init_checkpoint, loaded strictly."""
    path = _model_path(cfg.model.init_checkpoint)
    teacher = build_model(variant.removesuffix(DISTILL_SUFFIX), model_config, token2id)
    teacher.load_state_dict(load_state_dict(path), strict=True)
    return teacher


def init_model(cfg: TrainConfig, model) -> str:
    """Initialise a fresh model for the stage (not used when resuming). Returns a description."""
    m, stage = cfg.model, cfg.stage
    if m.init_checkpoint is None:
        if stage == "monologue":
            return "random initialisation"
        raise ValueError(f"stage {stage!r} needs model.init_checkpoint: training a dialog model from "
                         "random weights gives unintelligible speech (paper 4.1)")
    path = _model_path(m.init_checkpoint)
    if stage == "distill":
        sd = load_state_dict(path)
        if cfg.distill.stage == "second":
            model.load_state_dict(sd, strict=True)
            return f"distill stage 2 from the stage-1 result {path}"
        # The student is the teacher plus a freshly initialised guidance-scale embedding.
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or missing != ["fm_decoder.guidance_scale_embed.weight"]:
            raise ValueError(f"{path}: does not fit the student (missing {missing}, "
                             f"unexpected {unexpected})")
        return f"distill stage 1: student = teacher {path} + guidance-scale embedding"
    if stage == "monologue" or m.finetune:
        sd = load_state_dict(path)
        found, want = detect_variant(sd), VARIANTS[stage]
        if found != want:
            raise ValueError(f"{path}: holds a {found} model; stage {stage!r} "
                             f"{'with finetune: true ' if m.finetune else ''}needs {want}")
        model.load_state_dict(sd, strict=True)
        return f"weights of {path}"
    if stage == "dialog":
        g = torch.Generator().manual_seed(cfg.train.seed)
        init_dialog_from_zipvoice(model, path, generator=g)
        return f"curriculum init from ZipVoice {path} (+{model.vocab_size - 28}..{model.vocab_size - 1} new token rows)"
    init_stereo_from_dialog(model, path)
    return f"stereo init from ZipVoice-Dialog {path}"


def write_model_files(exp: Path, model, token2id: dict[str, int]) -> None:
    config = {"model": model.config, "feature": dict(FEATURE_CONFIG)}
    _atomic_write_text(exp / "model.json", json.dumps(config, indent=2) + "\n")
    tmp = exp / "tokens.txt.tmp"
    write_tokens(tmp, token2id)
    os.replace(tmp, exp / "tokens.txt")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(exp: Path) -> list[tuple[int, Path]]:
    """(batch_idx_train, path) of checkpoint-N.pt files, oldest first."""
    out = []
    for p in exp.glob("checkpoint-*.pt"):
        m = CHECKPOINT_RE.match(p.name)
        if m:
            out.append((int(m.group(2)), p))
    return sorted(out)


def newest_checkpoint(exp: Path) -> Path | None:
    """The checkpoint with the most updates among checkpoint-N.pt and epoch-E.pt."""
    best = None
    for p in list(exp.glob("checkpoint-*.pt")) + list(exp.glob("epoch-*.pt")):
        if not CHECKPOINT_RE.match(p.name):
            continue
        try:
            steps = int(torch.load(p, map_location="cpu", weights_only=True, mmap=True)["batch_idx_train"])
        except Exception as e:
            log.warning("ignoring unreadable checkpoint %s (%s)", p, e)
            continue
        if best is None or steps > best[0]:
            best = (steps, p)
    return None if best is None else best[1]


def update_model_avg(model_avg: dict, model, batch_idx_train: int, average_period: int) -> None:
    """model_avg becomes the mean of the weights at every average_period-th update so far."""
    w = average_period / batch_idx_train
    for k, v in model.state_dict().items():
        model_avg[k].mul_(1.0 - w).add_(v.detach().to("cpu", torch.float64), alpha=w)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_features(stage: str, features: torch.Tensor, batch_idx: int) -> torch.Tensor:
    """Stereo runs alternate mono (even) and stereo (odd) batches of the [ch0|ch1|mix] layout.

    `batch_idx` counts updates from 0 over the whole run, so the alternation is strict across
    epoch boundaries (the reference counts within the epoch: the same unless an epoch has an odd
    number of batches, which then gives two mono steps in a row)."""
    if stage != "stereo":
        return features
    return split_stereo_training_features(features, batch_idx)


def training_step(model, optimizer, scaler, tokens: list[list[int]], features: torch.Tensor,
                  features_lens: torch.Tensor, *, device: torch.device, precision: str,
                  condition_drop_ratio: float, **model_kwargs) -> dict:
    """One update: forward under autocast, (scaled) backward, optimizer step. ScaledAdam clips
    the gradient itself (2x the median RMS-weighted norm). Returns the detached outputs."""
    feats = features.to(device, non_blocking=True)
    lens = features_lens.to(device, non_blocking=True)
    with autocast(device, precision):
        out = model(tokens, feats, lens, condition_drop_ratio=condition_drop_ratio, **model_kwargs)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


@torch.no_grad()
def compute_validation_loss(model, stage: str, loader, device: torch.device, precision: str,
                            se_loss_weight: float, seed: int = 0, stereo: bool | None = None) -> dict:
    """Frame-weighted loss over the dev batches with t_b = b / B and fixed noise and prompt masks
    (from a private generator: validation never touches the training RNG). Stereo runs validate
    the stereo path. Distill runs (model = the DistillObjective) draw t, the step sizes and w
    from the same private generator."""
    stereo = stage == "stereo" if stereo is None else stereo
    distill = stage == "distill"
    suffix_mask = stage != "monologue" if not distill else \
        getattr(model.student, "spk_embed", None) is not None
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64)  # loss * frames, fm * frames, frames
    se_sum = 0.0
    for batch in loader:
        feats = batch["features"]
        if stereo:
            feats = feats[..., :200]
        B, T, _ = feats.shape
        lens = batch["features_lens"]
        t = torch.arange(B, dtype=torch.float32) / B
        noise = torch.randn(feats.shape, generator=g)
        percent = (model.student if distill else model).speech_mask_percent
        if suffix_mask:
            mask = condition_time_mask_suffix(lens, percent, T, generator=g)
        else:
            mask = condition_time_mask(lens, percent, T, generator=g)
        if distill:
            kwargs = {"generator": g}
        else:
            kwargs = {"t": t.to(device)}
            if stage == "stereo":
                kwargs["se_loss_weight"] = se_loss_weight
        with autocast(device, precision):
            out = model(batch["tokens"], feats.to(device), lens.to(device), condition_drop_ratio=0.0,
                        noise=noise.to(device), speech_mask=mask.to(device), **kwargs)
        frames = float(out["num_frames"])
        sums += torch.tensor([float(out["loss"]) * frames, float(out["fm_loss"]) * frames, frames],
                             dtype=torch.float64)
        if "se_loss" in out:
            se_sum += float(out["se_loss"]) * frames
    model.train(was_training)
    return {"sums": sums, "se_sum": se_sum}


def _reduce_validation(res: dict, env: DistEnv) -> dict:
    v = torch.cat([res["sums"], torch.tensor([res["se_sum"]], dtype=torch.float64)])
    if env.world_size > 1:
        import torch.distributed as dist

        backend_dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        v = v.to(backend_dev)
        dist.all_reduce(v)
        v = v.cpu()
    frames = max(float(v[2]), 1.0)
    return {"loss": float(v[0]) / frames, "fm_loss": float(v[1]) / frames,
            "se_loss": float(v[3]) / frames, "frames": float(v[2])}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    exp_dir: Path
    batch_idx_train: int
    losses: dict[int, float]  # update -> training loss (this process)
    valid: dict[int, float]  # update -> validation loss
    stopped_early: bool


class _Logs:
    """log/train.log, log/metrics.jsonl and TensorBoard on the main rank."""

    def __init__(self, exp: Path, env: DistEnv, tensorboard: bool, resume_step: int | None):
        self.env = env
        self.handler = None
        self.writer = None
        self.metrics = None
        if not env.is_main:
            return
        (exp / "log").mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(exp / "log" / "train.log", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.handler.setLevel(logging.INFO)
        pkg = logging.getLogger("model")
        self.old_level = pkg.level
        if pkg.getEffectiveLevel() > logging.INFO:  # the log file gets INFO lines in any case
            pkg.setLevel(logging.INFO)
        pkg.addHandler(self.handler)
        metrics = exp / "log" / "metrics.jsonl"
        if resume_step is not None and metrics.is_file():
            # Lines after the checkpoint belong to work that is redone now.
            keep = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            _atomic_write_text(metrics, "".join(line + "\n" for line in keep))
        elif metrics.is_file():
            metrics.unlink()
        self.metrics = open(metrics, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(exp / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def record(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.handler is not None:
            pkg = logging.getLogger("model")
            pkg.removeHandler(self.handler)
            pkg.setLevel(self.old_level)
            self.handler.close()


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a training. `stop_after`: return right after that update, without any
    end-of-training save (what a killed job leaves behind)."""
    env = setup_distributed()
    device = pick_device(cfg.train.device, env)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    tc = cfg.train
    exp = Path(cfg.exp_dir)
    if env.is_main:
        exp.mkdir(parents=True, exist_ok=True)
    _barrier(env)

    resume_path = newest_checkpoint(exp) if cfg.resume else None
    # mmap: every rank reads the (large) checkpoint without holding a full copy in memory
    ckpt = (torch.load(resume_path, map_location="cpu", weights_only=True, mmap=True)
            if resume_path else None)
    logs = _Logs(exp, env, tc.tensorboard, None if ckpt is None else int(ckpt["batch_idx_train"]))
    try:
        return _train(cfg, env, device, exp, ckpt, resume_path, logs, stop_after)
    finally:
        logs.close()


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _train(cfg, env, device, exp, ckpt, resume_path, logs, stop_after) -> TrainResult:
    tc, oc, stage = cfg.train, cfg.optim, cfg.stage
    seed_everything(rank_seed(tc.seed, 1, env.rank))

    config_file, token_file = resolve_model_files(cfg, resuming=ckpt is not None)
    model_config = read_model_config(config_file)
    token2id = read_tokens(token_file)
    variant = stage_variant(cfg, ckpt)
    stereo = variant in STEREO_VARIANTS
    monologue = variant.removesuffix(DISTILL_SUFFIX) == "zipvoice"
    tokenizer = get_tokenizer(cfg.model.tokenizer or ("emilia" if monologue else "dialog"),
                              token_file)
    model = build_for_stage(cfg, model_config, token2id, variant)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        how = f"resumed from {resume_path} (update {ckpt['batch_idx_train']})"
    else:
        how = init_model(cfg, model)
    model.set_attention_backend(cfg.model.attention_backend)
    model.to(device).train()
    objective = model  # what a training step calls: the model itself, or student + teacher
    if stage == "distill":
        from model.distill import DistillObjective

        if cfg.distill.stage == "first":
            teacher = load_teacher(cfg, model_config, token2id, variant)
            objective = DistillObjective(model, teacher, "first")
        else:
            objective = DistillObjective.with_ema_teacher(model, cfg.distill.ema_decay)
            if ckpt is not None and ckpt.get("model_ema") is not None:
                objective.teacher.load_state_dict(ckpt["model_ema"], strict=True)
        objective.teacher.set_attention_backend(cfg.model.attention_backend)
        objective.to(device).train()
    if env.is_main:
        write_model_files(exp, model, token2id)
        log.info("stage %s, %s model with %d parameters, vocab %d: %s", stage, variant,
                 sum(p.numel() for p in model.parameters()), model.vocab_size, how)
        log.info("device %s, world size %d, precision %s", device, env.world_size, tc.precision)

    # ---- data
    train_split, dev_split = load_datasets(cfg.data, require_dialog=not monologue,
                                           channels=2 if stereo else 1)
    if env.is_main:
        log.info("train: %s", describe(train_split))
        log.info("dev: %d utterances, %.2f h", len(dev_split.utts), dev_split.hours)
    sampler = BucketBatchSampler(
        [u.duration for u in train_split.utts], train_split.sources,
        max_duration=cfg.data.max_duration, repeats=[s.repeat for s in cfg.data.train],
        weights=[s.weight for s in cfg.data.train], num_buckets=cfg.data.num_buckets,
        buffer_size=cfg.data.buffer_size, drop_last=cfg.data.drop_last, seed=tc.seed,
        world_size=env.world_size, rank=env.rank)
    train_set = TTSDataset(train_split, tokenizer)
    dev_set = TTSDataset(dev_split, tokenizer)
    dev_loader = make_loader(dev_set, dev_batches(dev_split, cfg.data.max_duration, env.world_size,
                                                  env.rank), cfg.data.num_workers)

    # ---- optimisation
    optimizer = ScaledAdam(model.parameters(), lr=oc.lr, clipping_scale=oc.clipping_scale,
                           betas=tuple(oc.betas), scalar_lr_scale=oc.scalar_lr_scale, eps=oc.eps,
                           param_min_rms=oc.param_min_rms, param_max_rms=oc.param_max_rms,
                           scalar_max=oc.scalar_max, size_update_period=oc.size_update_period,
                           clipping_update_period=oc.clipping_update_period)
    if oc.scheduler == "eden":
        scheduler = Eden(optimizer, lr_batches=oc.lr_batches,
                         lr_epochs=oc.lr_hours if oc.lr_hours > 0 else oc.lr_epochs,
                         warmup_batches=oc.warmup_batches, warmup_start=oc.warmup_start)
    else:
        scheduler = FixedLR(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16", init_scale=1.0)

    model_avg = None
    if env.is_main:
        model_avg = {k: v.detach().to("cpu", torch.float64).clone() for k, v in model.state_dict().items()}
    batch_idx_train, epoch, position = 0, 1, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        if model_avg is not None and ckpt.get("model_avg") is not None:
            model_avg = {k: v.to(torch.float64).clone() for k, v in ckpt["model_avg"].items()}
        batch_idx_train = int(ckpt["batch_idx_train"])
        sampler.load_state_dict(ckpt["sampler"])
        epoch, position = sampler.epoch, sampler.position
        states = ckpt.get("rng") or []
        if len(states) == env.world_size:
            set_rng_state(states[env.rank])
        else:
            log.warning("checkpoint has RNG states of %d rank(s), this run has %d: reseeding",
                        len(states), env.world_size)
            seed_everything(rank_seed(tc.seed, epoch, env.rank) + batch_idx_train)

    ddp_model = objective
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)

    valid_every = tc.valid_every_n or tc.save_every_n
    losses: dict[int, float] = {}
    valid: dict[int, float] = {}
    max_hours_per_update = cfg.data.max_duration * env.world_size / 3600.0
    bad_scale_saved = False
    last_saved = batch_idx_train if ckpt is not None else -1

    def save_checkpoint(path: Path) -> None:
        rng = gather_objects(rng_state(), env)
        if not env.is_main:
            return
        obj = {"model": model_state_dict(model), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
               "sampler": {"epoch": epoch, "position": position, "seed": sampler.seed,
                           "world_size": env.world_size},
               "rng": rng, "model_avg": model_avg, "batch_idx_train": batch_idx_train,
               "epoch": epoch, "average_period": tc.average_period, "stage": stage,
               "variant": variant, "config": cfg.model_dump(mode="json")}
        if stage == "distill" and cfg.distill.stage == "second":
            obj["model_ema"] = model_state_dict(objective.teacher)
        _atomic_save(obj, path)
        _atomic_save({"model": obj["model"]}, exp / "model.pt")
        for _, old in list_checkpoints(exp)[: -tc.keep_last_k]:
            old.unlink(missing_ok=True)
        log.info("saved %s", path)

    def run_validation() -> None:
        if not dev_split.utts:
            return
        res = _reduce_validation(compute_validation_loss(objective, stage, dev_loader, device,
                                                         tc.precision, tc.se_loss_weight,
                                                         seed=tc.seed, stereo=stereo), env)
        valid[batch_idx_train] = res["loss"]
        if env.is_main:
            log.info("validation at update %d: loss %.5f (fm %.5f%s) over %d frames",
                     batch_idx_train, res["loss"], res["fm_loss"],
                     f", se {res['se_loss']:.5f}" if stage == "stereo" else "", res["frames"])
            logs.scalars("valid", {"loss": res["loss"], "fm_loss": res["fm_loss"],
                                   "se_loss": res["se_loss"] if stage == "stereo" else None},
                         batch_idx_train)
            logs.record({"step": batch_idx_train, "valid_loss": res["loss"]})

    def finished() -> bool:
        if tc.num_iters > 0:
            return batch_idx_train >= tc.num_iters
        return epoch > tc.num_epochs

    window_audio, window_start = 0.0, time.time()
    while not finished():
        batches = sampler.epoch_batches(epoch)
        if not batches:
            raise ValueError(f"epoch {epoch} has no batches: max_duration {cfg.data.max_duration} s "
                             "and drop_last leave nothing of the training data")
        if position == 0:
            seed_everything(rank_seed(tc.seed, epoch, env.rank))
        if oc.scheduler == "eden" and oc.lr_hours == 0:
            scheduler.step_epoch(epoch - 1)
        loader = make_loader(train_set, batches[position:], cfg.data.num_workers,
                             pin_memory=device.type == "cuda")
        for batch in loader:
            batch_idx_train += 1
            scheduler.step_batch(batch_idx_train)
            if oc.scheduler == "eden" and oc.lr_hours > 0:
                scheduler.step_epoch(batch_idx_train * max_hours_per_update)
            feats = step_features("stereo" if stereo else stage, batch["features"],
                                  batch_idx_train - 1)
            kwargs = {"se_loss_weight": tc.se_loss_weight} if stage == "stereo" else {}
            out = training_step(ddp_model, optimizer, scaler, batch["tokens"], feats,
                                batch["features_lens"], device=device, precision=tc.precision,
                                condition_drop_ratio=tc.condition_drop_ratio, **kwargs)
            if objective is not model:
                objective.update_teacher()
            position += 1
            loss_value = float(out["loss"])
            if not math.isfinite(loss_value):
                if tc.precision != "fp16":
                    raise FloatingPointError(f"non-finite loss {loss_value} at update "
                                             f"{batch_idx_train} (batch {batch['ids'][:3]}...)")
                log.warning("non-finite loss at update %d: the grad scaler skips it", batch_idx_train)
            losses[batch_idx_train] = loss_value
            window_audio += batch["duration"] * env.world_size
            if tc.precision == "fp16":
                scale = scaler.get_scale()
                new = grad_scale_update(scale, batch_idx_train)
                if new is not None:
                    scaler.update(new)
                if scale < 0.01 and not bad_scale_saved and env.is_main:
                    log.warning("grad scale %.2e is small: saving %s", scale, exp / "bad-model.pt")
                    _atomic_save({"model": model_state_dict(model)}, exp / "bad-model.pt")
                    bad_scale_saved = True
                if scale < 1e-5:
                    raise FloatingPointError(f"grad scale {scale:.2e} < 1e-5 at update "
                                             f"{batch_idx_train}: training diverged")
            if model_avg is not None and batch_idx_train % tc.average_period == 0:
                update_model_avg(model_avg, model, batch_idx_train, tc.average_period)
            if env.is_main:
                row = {"step": batch_idx_train, "epoch": epoch, "loss": loss_value,
                       "fm_loss": float(out["fm_loss"]), "lr": scheduler.get_last_lr()[0],
                       "batch_seconds": batch["duration"]}
                if stage == "stereo":
                    row["se_loss"] = float(out["se_loss"])
                    row["head"] = "mono" if (batch_idx_train - 1) % 2 == 0 else "stereo"
                if tc.precision == "fp16":
                    row["grad_scale"] = scaler.get_scale()
                if batch_idx_train % tc.log_interval == 0:
                    elapsed = max(time.time() - window_start, 1e-9)
                    row["audio_s_per_s"] = window_audio / elapsed
                    total = tc.num_iters or tc.num_epochs * len(batches)
                    log.info("epoch %d update %d/%d loss %.4f lr %.3e %s| %.1f s audio/s "
                             "(%.2f h audio per device-hour)", epoch, batch_idx_train, total,
                             loss_value, row["lr"],
                             f"scale {row['grad_scale']:.1f} " if "grad_scale" in row else "",
                             row["audio_s_per_s"], row["audio_s_per_s"] / env.world_size)
                    logs.scalars("train", {k: row.get(k) for k in ("loss", "fm_loss", "se_loss", "lr",
                                                                   "grad_scale", "audio_s_per_s")},
                                 batch_idx_train)
                    window_audio, window_start = 0.0, time.time()
                logs.record(row)
            if batch_idx_train % valid_every == 0:
                run_validation()
            if batch_idx_train % tc.save_every_n == 0:
                save_checkpoint(exp / f"checkpoint-{batch_idx_train}.pt")
                last_saved = batch_idx_train
            if stop_after is not None and batch_idx_train >= stop_after:
                return TrainResult(exp, batch_idx_train, losses, valid, True)
            if finished():
                break
        if position >= len(batches):
            done_epoch = epoch
            epoch, position = epoch + 1, 0
            if tc.num_iters == 0:  # epoch-based runs (monologue pre-training) average epochs
                save_checkpoint(exp / f"epoch-{done_epoch}.pt")
                last_saved = batch_idx_train

    if last_saved != batch_idx_train:
        save_checkpoint(exp / f"checkpoint-{batch_idx_train}.pt")
    if env.is_main:
        if tc.num_iters > 0:
            export_final_model(exp, tc.export_avg, iteration=batch_idx_train)
        else:
            export_final_model(exp, tc.export_avg, epoch=epoch - 1)
    _barrier(env)
    return TrainResult(exp, batch_idx_train, losses, valid, False)


def export_final_model(exp: Path, avg: int, *, iteration: int | None = None,
                       epoch: int | None = None) -> None:
    """exp/model.pt: the average over the last `avg` checkpoint intervals (or epochs; fact sheet
    7.3) when there are enough checkpoints, else the final weights (written by the last save)."""
    if avg <= 0:
        return
    from model.average import average_checkpoints

    try:
        sd, info = average_checkpoints(exp, iteration=iteration, epoch=epoch, avg=avg)
    except ValueError as e:
        log.warning("exp/model.pt keeps the final weights: cannot average (%s)", e)
        return
    _atomic_save({"model": sd}, exp / "model.pt")
    log.info("wrote %s: %s", exp / "model.pt", info)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m model.train", __doc__)
    p.add_argument("--config", required=True, help="training YAML (configs/train_*.yaml)")
    p.add_argument("--exp-dir", help="experiment folder (overrides exp_dir of the config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, the value read as YAML, e.g. "
                        "--set train.num_iters=1000 (repeatable; validated like the file)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="exit right after this update without a final save (tests, time slicing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return clitools.run(lambda: _main(args), args.debug)


def _main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    overrides = list(args.overrides)
    if args.exp_dir:
        overrides.append(f"exp_dir={args.exp_dir}")
    cfg = load_config(args.config, overrides)
    result = train(cfg, stop_after=args.stop_after)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if result.stopped_early:
        print(f"stopped after update {result.batch_idx_train}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
