"""Checkpoints in the official ZipVoice format, and the curriculum initialisations.

A model folder holds three files (reference fact sheet, section 7):
  * `model.pt`: `{"model": state_dict}` (read with `torch.load(weights_only=True)`: no pickled code
    is ever executed) or `model.safetensors` (a flat state dict);
  * `model.json`: `{"model": {the 18 architecture keys}, "feature": {"sampling_rate": 24000,
    "type": "vocos"}}`;
  * `tokens.txt`: `token<TAB>id` lines; vocab size, pad id and the `[S1]`/`[S2]` ids come from it.

The variant (ZipVoice / ZipVoice-Dialog / ZipVoice-Dialog-Stereo, each also distilled: a decoder
with `guidance_scale_embed`) is recognised from the keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.tokenizer import PAD_TOKEN, SPK_A_TOKEN, SPK_B_TOKEN, read_tokens, write_tokens
from model.zipvoice import (
    DISTILL_SUFFIX,
    MODEL_CLASSES,
    ZipVoice,
    ZipVoiceConfig,
    ZipVoiceDialog,
    ZipVoiceDialogStereo,
)
from pipeline.atomic import atomic_write

log = logging.getLogger(__name__)

FEATURE_CONFIG = {"sampling_rate": 24000, "type": "vocos"}
CHECKPOINT_RE = re.compile(r"^(checkpoint|epoch)-(\d+)\.pt$")
# The dialog token file is the ZipVoice file plus exactly this many appended tokens.
NUM_DIALOG_EXTRA_TOKENS = 28
MODEL_FILENAMES = ("model.pt", "model.safetensors")

StateDict = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_model_config(path: str | os.PathLike) -> dict:
    """Read and validate model.json; returns {"model": {...18 keys...}, "feature": {...}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: expected an object with a 'model' section")
    model_cfg = ZipVoiceConfig.from_dict(config["model"], str(path))
    feature = config.get("feature", FEATURE_CONFIG)
    if feature.get("type", "vocos") != "vocos" or int(feature.get("sampling_rate", 24000)) != 24000:
        raise ValueError(f"{path}: only 24 kHz vocos features are supported, got {feature}")
    return {"model": model_cfg.to_dict(), "feature": dict(feature)}


def write_model_config(path: str | os.PathLike, config: ZipVoiceConfig) -> None:
    """model.json: the 18 keys under "model" and the (fixed) feature section; atomically."""
    text = json.dumps({"model": config.to_dict(), "feature": dict(FEATURE_CONFIG)}, indent=2)
    atomic_write(Path(path), text + "\n")


def strip_ddp_prefix(state_dict: StateDict) -> StateDict:
    """Remove a leading `module.` (DDP) from every key that has it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """A state dict from `model.pt` (under "model", or flat) or `.safetensors`, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return strip_ddp_prefix(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled classes etc.: refuse rather than execute code
        raise ValueError(f"{path}: cannot be read as a plain-weights checkpoint "
                         f"(torch.load weights_only=True failed: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: no state dict found (expected {{'model': state_dict}} "
                         "or a flat dict of tensors)")
    return strip_ddp_prefix(obj)


def detect_variant(state_dict: StateDict) -> str:
    """"zipvoice", "zipvoice_dialog" or "zipvoice_dialog_stereo" from the state-dict keys, with
    "_distill" appended when the decoder has a guidance-scale embedding."""
    suffix = DISTILL_SUFFIX if "fm_decoder.guidance_scale_embed.weight" in state_dict else ""
    if "fm_decoder.in_proj.0.weight" in state_dict:
        return "zipvoice_dialog_stereo" + suffix
    if "spk_embed.weight" in state_dict:
        return "zipvoice_dialog" + suffix
    if "embed.weight" not in state_dict or "fm_decoder.in_proj.weight" not in state_dict:
        raise ValueError("not a ZipVoice state dict: 'embed.weight' / 'fm_decoder.in_proj.*' missing")
    return "zipvoice" + suffix


def token_ids(token2id: dict[str, int], variant: str) -> dict:
    """Constructor arguments that come from tokens.txt: vocab_size, pad_id (and speaker ids)."""
    if PAD_TOKEN not in token2id:
        raise ValueError(f"token table has no pad token {PAD_TOKEN!r}")
    kwargs = {"vocab_size": len(token2id), "pad_id": token2id[PAD_TOKEN]}
    if variant.removesuffix(DISTILL_SUFFIX) != "zipvoice":
        missing = [t for t in (SPK_A_TOKEN, SPK_B_TOKEN) if t not in token2id]
        if missing:
            raise ValueError(f"a dialog model needs {missing} in its token table")
        kwargs.update(spk_a_id=token2id[SPK_A_TOKEN], spk_b_id=token2id[SPK_B_TOKEN])
    return kwargs


def build_model(variant: str, model_config: dict, token2id: dict[str, int], **kwargs) -> ZipVoice:
    """A freshly initialised model of `variant` from the 18 config keys and the token table."""
    if variant not in MODEL_CLASSES:
        raise ValueError(f"unknown model variant {variant!r}; one of {sorted(MODEL_CLASSES)}")
    cfg = model_config.get("model", model_config)
    config = cfg if isinstance(cfg, ZipVoiceConfig) else ZipVoiceConfig.from_dict(cfg)
    return MODEL_CLASSES[variant](config, **token_ids(token2id, variant), **kwargs)


@dataclass
class LoadedModel:
    model: ZipVoice
    variant: str
    config: dict  # {"model": {...}, "feature": {...}}
    token2id: dict[str, int]
    token_file: Path
    checkpoint: Path


def _find_files(path: Path, token_file, config_file) -> tuple[Path, Path, Path]:
    if path.is_dir():
        candidates = [path / n for n in MODEL_FILENAMES if (path / n).is_file()]
        if not candidates:
            raise FileNotFoundError(f"{path}: no {' or '.join(MODEL_FILENAMES)} in this folder")
        ckpt, folder = candidates[0], path
    elif path.is_file():
        ckpt, folder = path, path.parent
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    token_file = Path(token_file) if token_file else folder / "tokens.txt"
    config_file = Path(config_file) if config_file else folder / "model.json"
    return ckpt, token_file, config_file


def load_model(path: str | os.PathLike, *, token_file: str | os.PathLike | None = None,
               config_file: str | os.PathLike | None = None, variant: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load an official (or our own) model folder or file strictly, in eval mode.

    `path` is a folder with model.pt|model.safetensors, model.json and tokens.txt, or a checkpoint
    file with the two others beside it (or given explicitly). The variant is detected from the
    keys unless given.
    """
    ckpt, token_file, config_file = _find_files(Path(path), token_file, config_file)
    config = read_model_config(config_file)
    token2id = read_tokens(token_file)
    state_dict = load_state_dict(ckpt)
    detected = detect_variant(state_dict)
    if variant is not None and variant != detected:
        raise ValueError(f"{ckpt}: holds a {detected} model, not {variant}")
    rows = state_dict["embed.weight"].shape[0]
    if rows != len(token2id):
        raise ValueError(f"{ckpt}: embed.weight has {rows} rows but {token_file} has "
                         f"{len(token2id)} tokens (use the tokens.txt shipped with the model)")
    model = build_model(detected, config, token2id)
    model.load_state_dict(state_dict, strict=True)
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, detected, config, token2id, token_file, ckpt)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def model_state_dict(model: ZipVoice) -> StateDict:
    """CPU, contiguous copy of the weights, keys exactly as the reference (no prefixes)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: ZipVoice, out_dir: str | os.PathLike, token2id: dict[str, int], *,
               filename: str = "model.pt") -> Path:
    """Write model.pt (= {"model": state_dict}) or model.safetensors, model.json and tokens.txt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(token2id) != model.vocab_size:
        raise ValueError(f"token table has {len(token2id)} tokens, the model {model.vocab_size}")
    sd = model_state_dict(model)
    target = out_dir / filename
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(target, lambda tmp: save_file(sd, str(tmp)))
    else:
        atomic_write(target, lambda tmp: torch.save({"model": sd}, tmp))
    write_model_files(out_dir, model, token2id)
    return target


def write_model_files(out_dir: Path, model: ZipVoice, token2id: dict[str, int]) -> None:
    """model.json and tokens.txt of `model`, each written atomically."""
    write_model_config(out_dir / "model.json", model.config)
    write_tokens(out_dir / "tokens.txt", token2id)


# --------------------------------------------------------------------------------------------
# Training checkpoints (checkpoint-N.pt / epoch-E.pt of an experiment folder)
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
            steps = int(read_training_checkpoint(p)["batch_idx_train"])
        except Exception as e:
            log.warning("ignoring unreadable checkpoint %s (%s)", p, e)
            continue
        if best is None or steps > best[0]:
            best = (steps, p)
    return None if best is None else best[1]


def read_training_checkpoint(path: Path) -> dict:
    # mmap: every rank reads the (large) checkpoint without holding a full copy in memory
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def save_training_checkpoint(st, path: Path, rng: list) -> None:
    """Write everything a `model.train.TrainState` needs to resume exactly (model, optimizer,
    scheduler, grad scaler, sampler position, every rank's RNG states `rng`, model_avg,
    counters, and what the stage adds), then exp/model.pt (the latest weights) and prune to the
    newest `keep_last_k` checkpoint-N.pt."""
    tc = st.cfg.train
    obj = {"model": model_state_dict(st.model), "optimizer": st.optimizer.state_dict(),
           "scheduler": st.scheduler.state_dict(), "grad_scaler": st.scaler.state_dict(),
           "sampler": {"epoch": st.epoch, "position": st.position, "seed": st.sampler.seed,
                       "world_size": st.env.world_size},
           "rng": rng, "model_avg": st.model_avg, "batch_idx_train": st.batch_idx_train,
           "epoch": st.epoch, "average_period": tc.average_period, "stage": st.stage.name,
           "variant": st.variant, "config": st.cfg.model_dump(mode="json"),
           **st.stage.checkpoint_extras(st.objective)}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    atomic_write(path.parent / "model.pt", lambda tmp: torch.save({"model": obj["model"]}, tmp))
    for _, old in list_checkpoints(path.parent)[: -tc.keep_last_k]:
        old.unlink(missing_ok=True)


def load_training_checkpoint(st, ckpt: dict) -> list:
    """Restore a `model.train.TrainState` (whose model already holds ckpt["model"]) from a
    training checkpoint. Returns the saved per-rank RNG states."""
    st.optimizer.load_state_dict(ckpt["optimizer"])
    st.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("grad_scaler"):
        st.scaler.load_state_dict(ckpt["grad_scaler"])
    if st.model_avg is not None and ckpt.get("model_avg") is not None:
        st.model_avg = {k: v.to(torch.float64).clone() for k, v in ckpt["model_avg"].items()}
    st.batch_idx_train = st.last_saved = int(ckpt["batch_idx_train"])
    st.sampler.load_state_dict(ckpt["sampler"])
    st.epoch, st.position = st.sampler.epoch, st.sampler.position
    return ckpt.get("rng") or []


# --------------------------------------------------------------------------------------------
# Curriculum initialisation
# --------------------------------------------------------------------------------------------


def _as_state_dict(source) -> StateDict:
    return strip_ddp_prefix(source) if isinstance(source, dict) else load_state_dict(source)


def init_dialog_from_zipvoice(dialog_model: ZipVoiceDialog, zipvoice_source,
                              generator: torch.Generator | None = None) -> ZipVoiceDialog:
    """Stage 2 of the curriculum: start ZipVoice-Dialog from a monologue ZipVoice.

    The dialog vocabulary must be the ZipVoice one plus exactly 28 appended tokens. Rows [0, V0)
    of `embed.weight` and every other weight are copied; the 28 new rows are drawn fresh from
    N(0, 1) (nn.Embedding's default) and `spk_embed` from N(0, 0.1). Loaded strictly.
    """
    if type(dialog_model) is not ZipVoiceDialog:
        raise TypeError("init_dialog_from_zipvoice needs a ZipVoiceDialog model")
    sd = dict(_as_state_dict(zipvoice_source))
    if detect_variant(sd) != "zipvoice":
        raise ValueError(f"expected a ZipVoice (monologue) state dict, got {detect_variant(sd)}")
    old = sd["embed.weight"]
    v0, v = old.shape[0], dialog_model.vocab_size
    if v != v0 + NUM_DIALOG_EXTRA_TOKENS:
        raise ValueError(f"dialog vocabulary ({v}) must be the ZipVoice vocabulary ({v0}) plus "
                         f"exactly {NUM_DIALOG_EXTRA_TOKENS} tokens")
    w = dialog_model.embed.weight
    fresh = torch.randn(v - v0, old.shape[1], generator=generator, dtype=torch.float32)
    sd["embed.weight"] = torch.cat([old.to(torch.float32), fresh]).to(w.dtype)
    spk = torch.randn(dialog_model.spk_embed.weight.shape, generator=generator) * 0.1
    sd["spk_embed.weight"] = spk.to(dialog_model.spk_embed.weight.dtype)
    dialog_model.load_state_dict(sd, strict=True)
    return dialog_model


def init_stereo_from_dialog(stereo_model: ZipVoiceDialogStereo, dialog_source) -> ZipVoiceDialogStereo:
    """Start ZipVoice-Dialog-Stereo from ZipVoice-Dialog (section 5.9 / paper A.1.1).

    Mono head 1 = the dialog projections unchanged. Stereo head 0: in_proj columns
    [Wx/2, Wx/2, Wt, Ws/2, Ws/2] with the dialog bias, out_proj rows [W_out; W_out] and bias
    [b; b]. At init the stereo head thus sees the channel average and predicts the same velocity
    for both channels.
    """
    if not isinstance(stereo_model, ZipVoiceDialogStereo):
        raise TypeError("init_stereo_from_dialog needs a ZipVoiceDialogStereo model")
    sd = dict(_as_state_dict(dialog_source))
    if detect_variant(sd) != "zipvoice_dialog":
        raise ValueError(f"expected a ZipVoice-Dialog state dict, got {detect_variant(sd)}")
    F_ = stereo_model.feat_dim
    w_in, b_in = sd.pop("fm_decoder.in_proj.weight"), sd.pop("fm_decoder.in_proj.bias")
    w_out, b_out = sd.pop("fm_decoder.out_proj.weight"), sd.pop("fm_decoder.out_proj.bias")
    if w_in.shape[1] != 3 * F_:
        raise ValueError(f"dialog in_proj has {w_in.shape[1]} inputs, expected {3 * F_}")
    wx, wt, ws = w_in[:, :F_], w_in[:, F_: 2 * F_], w_in[:, 2 * F_:]
    sd["fm_decoder.in_proj.0.weight"] = torch.cat([wx / 2, wx / 2, wt, ws / 2, ws / 2], dim=1)
    sd["fm_decoder.in_proj.0.bias"] = b_in.clone()
    sd["fm_decoder.in_proj.1.weight"] = w_in
    sd["fm_decoder.in_proj.1.bias"] = b_in
    sd["fm_decoder.out_proj.0.weight"] = torch.cat([w_out, w_out], dim=0)
    sd["fm_decoder.out_proj.0.bias"] = torch.cat([b_out, b_out], dim=0)
    sd["fm_decoder.out_proj.1.weight"] = w_out
    sd["fm_decoder.out_proj.1.bias"] = b_out
    stereo_model.load_state_dict(sd, strict=True)
    return stereo_model
