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
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.checkpoint import (
    build_model,
    detect_variant,
    init_dialog_from_zipvoice,
    init_stereo_from_dialog,
    load_state_dict,
    load_training_checkpoint,
    model_state_dict,
    newest_checkpoint,
    read_model_config,
    read_training_checkpoint,
    save_training_checkpoint,
    write_model_files,
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
from model.tokenizer import get_tokenizer, read_tokens
from model.zipformer import Regularisation
from model.zipvoice import DISTILL_SUFFIX
from pipeline import clitools
from pipeline.atomic import atomic_write
from pipeline.config import apply_overrides

log = logging.getLogger("model.train")

STEREO_VARIANTS = ("zipvoice_dialog_stereo", "zipvoice_dialog_stereo" + DISTILL_SUFFIX)


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


def resolve_model_files(cfg: TrainConfig, stage: "Stage", resuming: bool) -> tuple[Path, Path]:
    """(model.json, tokens.txt) for the model being trained."""
    exp = Path(cfg.exp_dir)
    m = cfg.model
    config = Path(m.config) if m.config else (exp / "model.json" if resuming else
                                               _beside(m.init_checkpoint, "model.json"))
    if config is None:
        raise ValueError("model.config is not set and no model.json lies beside model.init_checkpoint")
    tokens = Path(m.token_file) if m.token_file else (exp / "tokens.txt" if resuming else None)
    if tokens is None:
        stage.check_token_file_default()
        tokens = _beside(m.init_checkpoint, "tokens.txt")
        if tokens is None:
            raise ValueError("model.token_file is not set and no tokens.txt lies beside "
                             "model.init_checkpoint")
    return config, tokens


# --------------------------------------------------------------------------------------------
# Stages: what differs between monologue, dialog, stereo and distill training
# --------------------------------------------------------------------------------------------


class Stage:
    """One training stage. What differs between variants *within* a stage (prompt masks, the
    stereo mono/stereo alternation) lives on the model classes; this holds what the stage adds:
    how the model is initialised, what a step trains, and what a checkpoint carries besides."""

    name = ""
    variant_name = ""  # the model variant trained
    has_se_loss = False  # the speaker-exclusive loss is trained and reported

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def variant(self, ckpt: dict | None) -> str:
        return self.variant_name

    def check_token_file_default(self) -> None:
        """Called when tokens.txt would be taken from beside init_checkpoint."""

    def init_model(self, model) -> str:
        """Initialise a fresh model (not used when resuming). Returns a description."""
        m = self.cfg.model
        if m.init_checkpoint is None:
            return self.init_random()
        path = _model_path(m.init_checkpoint)
        if m.finetune:
            return self.load_same_variant(model, path)
        return self.init_from(model, path)

    def init_random(self) -> str:
        raise ValueError(f"stage {self.name!r} needs model.init_checkpoint: training a dialog model "
                         "from random weights gives unintelligible speech (paper 4.1)")

    def init_from(self, model, path: str) -> str:
        return self.load_same_variant(model, path)

    def load_same_variant(self, model, path: str) -> str:
        sd = load_state_dict(path)
        found, want = detect_variant(sd), self.variant_name
        if found != want:
            raise ValueError(f"{path}: holds a {found} model; stage {self.name!r} "
                             f"{'with finetune: true ' if self.cfg.model.finetune else ''}needs {want}")
        model.load_state_dict(sd, strict=True)
        return f"weights of {path}"

    def objective(self, model, model_config: dict, token2id: dict[str, int], variant: str,
                  ckpt: dict | None):
        """What a training step calls: the model itself, or a wrapper holding it."""
        return model

    def step_kwargs(self) -> dict:
        return {}

    def after_update(self, objective) -> None:
        """Called after every optimizer step."""

    def checkpoint_extras(self, objective) -> dict:
        return {}

    def log_extras(self, out: dict, batch_idx: int) -> dict:
        """Extra metrics of update `batch_idx` (from 1) for the log."""
        return {}

    def validation_kwargs(self, t: torch.Tensor, generator: torch.Generator) -> dict:
        return {"t": t}


class MonologueStage(Stage):
    name, variant_name = "monologue", "zipvoice"

    def init_random(self) -> str:
        return "random initialisation"

    def init_model(self, model) -> str:
        m = self.cfg.model
        if m.init_checkpoint is None:
            return self.init_random()
        return self.load_same_variant(model, _model_path(m.init_checkpoint))


class DialogStage(Stage):
    name, variant_name = "dialog", "zipvoice_dialog"

    def check_token_file_default(self) -> None:
        if not self.cfg.model.finetune:
            raise ValueError("model.token_file must name the ZipVoice-Dialog tokens.txt: the dialog "
                             "vocabulary is the ZipVoice one plus 28 tokens (fact sheet 5.4)")

    def init_from(self, model, path: str) -> str:
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        init_dialog_from_zipvoice(model, path, generator=g)
        return (f"curriculum init from ZipVoice {path} "
                f"(+{model.vocab_size - 28}..{model.vocab_size - 1} new token rows)")


class StereoStage(Stage):
    name, variant_name = "stereo", "zipvoice_dialog_stereo"
    has_se_loss = True

    def init_from(self, model, path: str) -> str:
        init_stereo_from_dialog(model, path)
        return f"stereo init from ZipVoice-Dialog {path}"

    def step_kwargs(self) -> dict:
        return {"se_loss_weight": self.cfg.train.se_loss_weight}

    def validation_kwargs(self, t, generator) -> dict:
        return {"t": t, "se_loss_weight": self.cfg.train.se_loss_weight}

    def log_extras(self, out: dict, batch_idx: int) -> dict:
        return {"se_loss": float(out["se_loss"]), "head": "mono" if (batch_idx - 1) % 2 == 0 else "stereo"}


class DistillStage(Stage):
    """The few-step variant (`model.distill`) of the model in init_checkpoint."""

    name = "distill"

    def variant(self, ckpt: dict | None) -> str:
        """The *_distill form of the model in init_checkpoint (or in the checkpoint resumed from)."""
        if ckpt is not None:
            return detect_variant(ckpt["model"])
        cfg = self.cfg
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

    def init_model(self, model) -> str:
        m = self.cfg.model
        if m.init_checkpoint is None:
            return self.init_random()
        path = _model_path(m.init_checkpoint)
        sd = load_state_dict(path)
        if self.cfg.distill.stage == "second":
            model.load_state_dict(sd, strict=True)
            return f"distill stage 2 from the stage-1 result {path}"
        # The student is the teacher plus a freshly initialised guidance-scale embedding.
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or missing != ["fm_decoder.guidance_scale_embed.weight"]:
            raise ValueError(f"{path}: does not fit the student (missing {missing}, "
                             f"unexpected {unexpected})")
        return f"distill stage 1: student = teacher {path} + guidance-scale embedding"

    def objective(self, model, model_config, token2id, variant, ckpt):
        from model.distill import DistillObjective

        cfg = self.cfg
        if cfg.distill.stage == "first":
            teacher = load_teacher(cfg, model_config, token2id, variant)
            objective = DistillObjective(model, teacher, "first")
        else:
            objective = DistillObjective.with_ema_teacher(model, cfg.distill.ema_decay)
            if ckpt is not None and ckpt.get("model_ema") is not None:
                objective.teacher.load_state_dict(ckpt["model_ema"], strict=True)
        objective.teacher.set_attention_backend(cfg.model.attention_backend)
        return objective

    def after_update(self, objective) -> None:
        objective.update_teacher()

    def checkpoint_extras(self, objective) -> dict:
        if self.cfg.distill.stage == "second":
            return {"model_ema": model_state_dict(objective.teacher)}
        return {}

    def validation_kwargs(self, t, generator) -> dict:
        return {"generator": generator}  # t, the step sizes and w from the private generator


STAGES: dict[str, type[Stage]] = {s.name: s for s in (MonologueStage, DialogStage, StereoStage,
                                                       DistillStage)}


def make_stage(cfg: TrainConfig) -> Stage:
    return STAGES[cfg.stage](cfg)


def build_for_stage(cfg: TrainConfig, model_config: dict, token2id: dict[str, int],
                    variant: str | None = None):
    reg = Regularisation(**cfg.model.regularisation)
    return build_model(variant or make_stage(cfg).variant_name, model_config, token2id,
                       regularisation=reg)


def load_teacher(cfg: TrainConfig, model_config: dict, token2id: dict[str, int], variant: str):
    """Distill stage 'first': the fixed many-step model of init_checkpoint, loaded strictly."""
    path = _model_path(cfg.model.init_checkpoint)
    teacher = build_model(variant.removesuffix(DISTILL_SUFFIX), model_config, token2id)
    teacher.load_state_dict(load_state_dict(path), strict=True)
    return teacher


def init_model(cfg: TrainConfig, model) -> str:
    """Initialise a fresh model for the stage (not used when resuming). Returns a description."""
    return make_stage(cfg).init_model(model)


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
def compute_validation_loss(objective, model, stage: Stage, loader, device: torch.device,
                            precision: str, seed: int = 0) -> dict:
    """Frame-weighted loss over the dev batches with t_b = b / B and fixed noise and prompt masks
    (from a private generator: validation never touches the training RNG). `model` is the model
    trained (the student of a distill objective): its prompt mask and validated features."""
    was_training = objective.training
    objective.eval()
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64)  # loss * frames, fm * frames, frames
    se_sum = 0.0
    for batch in loader:
        feats = model.validation_features(batch["features"])
        B, T, _ = feats.shape
        lens = batch["features_lens"]
        t = torch.arange(B, dtype=torch.float32) / B
        noise = torch.randn(feats.shape, generator=g)
        mask = model.speech_condition_mask(lens, T, generator=g)
        kwargs = stage.validation_kwargs(t.to(device), g)
        with autocast(device, precision):
            out = objective(batch["tokens"], feats.to(device), lens.to(device),
                            condition_drop_ratio=0.0, noise=noise.to(device),
                            speech_mask=mask.to(device), **kwargs)
        frames = float(out["num_frames"])
        sums += torch.tensor([float(out["loss"]) * frames, float(out["fm_loss"]) * frames, frames],
                             dtype=torch.float64)
        if "se_loss" in out:
            se_sum += float(out["se_loss"]) * frames
    objective.train(was_training)
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
            atomic_write(metrics, "".join(line + "\n" for line in keep))
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


@dataclasses.dataclass
class TrainState:
    """Everything a run carries from update to update (what a checkpoint saves, and more)."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    exp: Path
    stage: Stage
    variant: str
    model: Any  # the model trained (the student when distilling)
    objective: Any  # what a step calls: the model, or a distill objective holding it
    step_module: Any  # the objective, DDP-wrapped in a multi-process run
    optimizer: ScaledAdam
    scheduler: Any
    scaler: torch.amp.GradScaler
    sampler: BucketBatchSampler
    train_set: TTSDataset
    dev_split: Any
    dev_loader: Any
    logs: _Logs
    model_avg: dict | None = None
    batch_idx_train: int = 0
    epoch: int = 1
    position: int = 0
    last_saved: int = -1
    bad_scale_saved: bool = False
    losses: dict = dataclasses.field(default_factory=dict)
    valid: dict = dataclasses.field(default_factory=dict)
    window_audio: float = 0.0
    window_start: float = dataclasses.field(default_factory=time.time)

    def finished(self) -> bool:
        tc = self.cfg.train
        if tc.num_iters > 0:
            return self.batch_idx_train >= tc.num_iters
        return self.epoch > tc.num_epochs


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a training. `stop_after`: return right after that update, without any
    end-of-training save (what a killed job leaves behind)."""
    env = setup_distributed()
    device = pick_device(cfg.train.device, env)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    exp = Path(cfg.exp_dir)
    if env.is_main:
        exp.mkdir(parents=True, exist_ok=True)
    _barrier(env)

    resume_path = newest_checkpoint(exp) if cfg.resume else None
    ckpt = read_training_checkpoint(resume_path) if resume_path else None
    logs = _Logs(exp, env, cfg.train.tensorboard, None if ckpt is None else int(ckpt["batch_idx_train"]))
    try:
        st = setup_training(cfg, env, device, exp, ckpt, resume_path, logs)
        return train_loop(st, stop_after)
    finally:
        logs.close()


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def setup_training(cfg: TrainConfig, env: DistEnv, device: torch.device, exp: Path,
                   ckpt: dict | None, resume_path: Path | None, logs: _Logs) -> TrainState:
    """Model (fresh or resumed), data, optimizer and counters of a run."""
    tc, oc = cfg.train, cfg.optim
    stage = make_stage(cfg)
    seed_everything(rank_seed(tc.seed, 1, env.rank))

    config_file, token_file = resolve_model_files(cfg, stage, resuming=ckpt is not None)
    model_config = read_model_config(config_file)
    token2id = read_tokens(token_file)
    variant = stage.variant(ckpt)
    monologue = variant.removesuffix(DISTILL_SUFFIX) == "zipvoice"
    tokenizer = get_tokenizer(cfg.model.tokenizer or ("emilia" if monologue else "dialog"),
                              token_file)
    model = build_for_stage(cfg, model_config, token2id, variant)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        how = f"resumed from {resume_path} (update {ckpt['batch_idx_train']})"
    else:
        how = stage.init_model(model)
    model.set_attention_backend(cfg.model.attention_backend)
    model.to(device).train()
    objective = stage.objective(model, model_config, token2id, variant, ckpt)
    objective.to(device).train()
    if env.is_main:
        write_model_files(exp, model, token2id)
        log.info("stage %s, %s model with %d parameters, vocab %d: %s", stage.name, variant,
                 sum(p.numel() for p in model.parameters()), model.vocab_size, how)
        log.info("device %s, world size %d, precision %s", device, env.world_size, tc.precision)

    # ---- data
    train_split, dev_split = load_datasets(cfg.data, require_dialog=not monologue,
                                           channels=2 if variant in STEREO_VARIANTS else 1)
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

    st = TrainState(cfg=cfg, env=env, device=device, exp=exp, stage=stage, variant=variant,
                    model=model, objective=objective, step_module=objective, optimizer=optimizer,
                    scheduler=scheduler, scaler=scaler, sampler=sampler, train_set=train_set,
                    dev_split=dev_split, dev_loader=dev_loader, logs=logs)
    if env.is_main:
        st.model_avg = {k: v.detach().to("cpu", torch.float64).clone()
                        for k, v in model.state_dict().items()}
    if ckpt is not None:
        states = load_training_checkpoint(st, ckpt)
        if len(states) == env.world_size:
            set_rng_state(states[env.rank])
        else:
            log.warning("checkpoint has RNG states of %d rank(s), this run has %d: reseeding",
                        len(states), env.world_size)
            seed_everything(rank_seed(tc.seed, st.epoch, env.rank) + st.batch_idx_train)

    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        st.step_module = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                             find_unused_parameters=True)
    return st


def save_checkpoint(st: TrainState, path: Path) -> None:
    """Every rank gives its RNG state; the main rank writes (model/checkpoint.py)."""
    rng = gather_objects(rng_state(), st.env)
    if st.env.is_main:
        save_training_checkpoint(st, path, rng)
        log.info("saved %s", path)
    st.last_saved = st.batch_idx_train


def run_validation(st: TrainState) -> None:
    if not st.dev_split.utts:
        return
    tc = st.cfg.train
    res = _reduce_validation(compute_validation_loss(st.objective, st.model, st.stage, st.dev_loader,
                                                     st.device, tc.precision, seed=tc.seed), st.env)
    st.valid[st.batch_idx_train] = res["loss"]
    if st.env.is_main:
        se = st.stage.has_se_loss
        log.info("validation at update %d: loss %.5f (fm %.5f%s) over %d frames",
                 st.batch_idx_train, res["loss"], res["fm_loss"],
                 f", se {res['se_loss']:.5f}" if se else "", res["frames"])
        st.logs.scalars("valid", {"loss": res["loss"], "fm_loss": res["fm_loss"],
                                  "se_loss": res["se_loss"] if se else None}, st.batch_idx_train)
        st.logs.record({"step": st.batch_idx_train, "valid_loss": res["loss"]})


def train_one_batch(st: TrainState, batch: dict, epoch_len: int) -> None:
    """One update on `batch`, then its bookkeeping: model average, logs, fp16 grad scale."""
    cfg, tc, oc = st.cfg, st.cfg.train, st.cfg.optim
    st.batch_idx_train += 1
    n = st.batch_idx_train
    st.scheduler.step_batch(n)
    if oc.scheduler == "eden" and oc.lr_hours > 0:
        hours_per_update = cfg.data.max_duration * st.env.world_size / 3600.0
        st.scheduler.step_epoch(n * hours_per_update)
    feats = st.model.training_features(batch["features"], n - 1)
    out = training_step(st.step_module, st.optimizer, st.scaler, batch["tokens"], feats,
                        batch["features_lens"], device=st.device, precision=tc.precision,
                        condition_drop_ratio=tc.condition_drop_ratio, **st.stage.step_kwargs())
    st.stage.after_update(st.objective)
    st.position += 1
    loss_value = float(out["loss"])
    if not math.isfinite(loss_value):
        if tc.precision != "fp16":
            raise FloatingPointError(f"non-finite loss {loss_value} at update {n} "
                                     f"(batch {batch['ids'][:3]}...)")
        log.warning("non-finite loss at update %d: the grad scaler skips it", n)
    st.losses[n] = loss_value
    st.window_audio += batch["duration"] * st.env.world_size
    if tc.precision == "fp16":
        _check_grad_scale(st)
    if st.model_avg is not None and n % tc.average_period == 0:
        update_model_avg(st.model_avg, st.model, n, tc.average_period)
    if st.env.is_main:
        _log_update(st, out, loss_value, batch["duration"], epoch_len)


def _check_grad_scale(st: TrainState) -> None:
    scale = st.scaler.get_scale()
    new = grad_scale_update(scale, st.batch_idx_train)
    if new is not None:
        st.scaler.update(new)
    if scale < 0.01 and not st.bad_scale_saved and st.env.is_main:
        log.warning("grad scale %.2e is small: saving %s", scale, st.exp / "bad-model.pt")
        weights = {"model": model_state_dict(st.model)}
        atomic_write(st.exp / "bad-model.pt", lambda tmp: torch.save(weights, tmp))
        st.bad_scale_saved = True
    if scale < 1e-5:
        raise FloatingPointError(f"grad scale {scale:.2e} < 1e-5 at update "
                                 f"{st.batch_idx_train}: training diverged")


def _log_update(st: TrainState, out: dict, loss_value: float, seconds: float, epoch_len: int) -> None:
    tc, n = st.cfg.train, st.batch_idx_train
    row = {"step": n, "epoch": st.epoch, "loss": loss_value, "fm_loss": float(out["fm_loss"]),
           "lr": st.scheduler.get_last_lr()[0], "batch_seconds": seconds}
    row.update(st.stage.log_extras(out, n))
    if tc.precision == "fp16":
        row["grad_scale"] = st.scaler.get_scale()
    if n % tc.log_interval == 0:
        elapsed = max(time.time() - st.window_start, 1e-9)
        row["audio_s_per_s"] = st.window_audio / elapsed
        total = tc.num_iters or tc.num_epochs * epoch_len
        log.info("epoch %d update %d/%d loss %.4f lr %.3e %s| %.1f s audio/s "
                 "(%.2f h audio per device-hour)", st.epoch, n, total, loss_value, row["lr"],
                 f"scale {row['grad_scale']:.1f} " if "grad_scale" in row else "",
                 row["audio_s_per_s"], row["audio_s_per_s"] / st.env.world_size)
        st.logs.scalars("train", {k: row.get(k) for k in ("loss", "fm_loss", "se_loss", "lr",
                                                          "grad_scale", "audio_s_per_s")}, n)
        st.window_audio, st.window_start = 0.0, time.time()
    st.logs.record(row)


def train_loop(st: TrainState, stop_after: int | None = None) -> TrainResult:
    """Epochs of updates with validation and checkpoints until num_iters / num_epochs."""
    cfg, tc, oc = st.cfg, st.cfg.train, st.cfg.optim
    valid_every = tc.valid_every_n or tc.save_every_n
    st.window_audio, st.window_start = 0.0, time.time()
    while not st.finished():
        batches = st.sampler.epoch_batches(st.epoch)
        if not batches:
            raise ValueError(f"epoch {st.epoch} has no batches: max_duration {cfg.data.max_duration} "
                             "s and drop_last leave nothing of the training data")
        if st.position == 0:
            seed_everything(rank_seed(tc.seed, st.epoch, st.env.rank))
        if oc.scheduler == "eden" and oc.lr_hours == 0:
            st.scheduler.step_epoch(st.epoch - 1)
        loader = make_loader(st.train_set, batches[st.position:], cfg.data.num_workers,
                             pin_memory=st.device.type == "cuda")
        for batch in loader:
            train_one_batch(st, batch, len(batches))
            n = st.batch_idx_train
            if n % valid_every == 0:
                run_validation(st)
            if n % tc.save_every_n == 0:
                save_checkpoint(st, st.exp / f"checkpoint-{n}.pt")
            if stop_after is not None and n >= stop_after:
                return TrainResult(st.exp, n, st.losses, st.valid, True)
            if st.finished():
                break
        if st.position >= len(batches):
            done_epoch = st.epoch
            st.epoch, st.position = st.epoch + 1, 0
            if tc.num_iters == 0:  # epoch-based runs (monologue pre-training) average epochs
                save_checkpoint(st, st.exp / f"epoch-{done_epoch}.pt")

    if st.last_saved != st.batch_idx_train:
        save_checkpoint(st, st.exp / f"checkpoint-{st.batch_idx_train}.pt")
    if st.env.is_main:
        if tc.num_iters > 0:
            export_final_model(st.exp, tc.export_avg, iteration=st.batch_idx_train)
        else:
            export_final_model(st.exp, tc.export_avg, epoch=st.epoch - 1)
    _barrier(st.env)
    return TrainResult(st.exp, st.batch_idx_train, st.losses, st.valid, False)


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
    atomic_write(exp / "model.pt", lambda tmp: torch.save({"model": sd}, tmp))
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
