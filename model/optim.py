"""ScaledAdam and the two learning-rate schedules of the ZipVoice recipes (fact sheet 5.5).

ScaledAdam, per parameter tensor (written from the description of the reference optimizer):
  * the Adam-normalised update grad / (sqrt(exp_avg_sq) + eps) is multiplied by the tensor's RMS,
    clamped to [param_min_rms, param_max_rms], so the LR is *relative* to the parameter size;
  * the scale of each tensor is learned separately: every `size_update_period` steps the
    accumulated d(loss)/d(log scale) = sum(p * grad) drives an Adam-normalised multiplicative
    step with lr * scalar_lr_scale (tensors above param_max_rms are shrunk, tensors below
    param_min_rms are not shrunk further);
  * one-element tensors (e.g. BiasNorm's `log_scale`) get plain Adam steps with
    lr * scalar_lr_scale and are clamped to [-scalar_max, scalar_max];
  * momentum (beta1) is applied to the update ("delta") without bias correction;
  * gradient clipping: the global norm of the RMS-weighted gradients (grad * param_rms; raw grad
    for scalars) is clipped to clipping_scale x its median over the last
    `clipping_update_period` steps. The threshold is refreshed every `clipping_update_period`
    steps, so nothing is clipped during the first period.

Parameters without a gradient in a step (the idle head of the stereo decoder) are treated as having
a zero gradient, so their momentum keeps decaying as in the reference.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class ScaledAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 3e-2, clipping_scale: float | None = 2.0,
                 betas: tuple[float, float] = (0.9, 0.98), scalar_lr_scale: float = 0.1,
                 eps: float = 1e-8, param_min_rms: float = 1e-5, param_max_rms: float = 3.0,
                 scalar_max: float = 10.0, size_update_period: int = 4,
                 clipping_update_period: int = 100):
        if lr <= 0:
            raise ValueError(f"ScaledAdam: lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"ScaledAdam: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, clipping_scale=clipping_scale, betas=tuple(betas),
                        scalar_lr_scale=scalar_lr_scale, eps=eps, param_min_rms=param_min_rms,
                        param_max_rms=param_max_rms, scalar_max=scalar_max,
                        size_update_period=size_update_period,
                        clipping_update_period=clipping_update_period)
        super().__init__(params, defaults)

    # ---- state -----------------------------------------------------------------------------

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        state["step"] = 0
        state["delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() > 1:
            rms = p.detach().float().pow(2).mean().sqrt().reshape(1).to(p.dtype)
            state["param_rms"] = rms
            state["scale_exp_avg_sq"] = torch.zeros_like(rms)
            state["scale_grads"] = torch.zeros(group["size_update_period"], dtype=p.dtype,
                                               device=p.device)

    def _group_state(self, group: dict) -> dict:
        # Clipping bookkeeping lives in the state of the group's first parameter, so that it is
        # part of state_dict() and a resumed run clips exactly as an uninterrupted one.
        return self.state[group["params"][0]]

    # ---- clipping --------------------------------------------------------------------------

    def _clipping_factor(self, group: dict, params: list[Tensor]) -> float:
        scale = group["clipping_scale"]
        first = self._group_state(group)
        step = first["step"]
        if scale is None or step == 0:
            return 1.0
        period = group["clipping_update_period"]
        sumsq = None
        for p in params:
            g = p.grad
            if g is None:
                continue
            st = self.state[p]
            # sum((g * rms)^2) = rms^2 * |g|^2: one read of g, no full-size temporary
            sq = torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
            term = sq if p.numel() == 1 else sq * st["param_rms"].float() ** 2
            sumsq = term if sumsq is None else sumsq + term
        if sumsq is None:
            return 1.0
        norm = sumsq.sqrt()
        if "model_norms" not in first:
            first["model_norms"] = torch.zeros(period, dtype=torch.float32, device=norm.device)
            first["num_clipped"] = 0
        first["model_norms"][step % period] = norm
        if step % period == 0:
            ordered = first["model_norms"].sort().values.cpu()
            quartiles = [float(ordered[min(period - 1, (period // 4) * n)]) for n in range(5)]
            first["model_norm_threshold"] = torch.tensor(scale * quartiles[2])
            log.info("clipping: grad-norm quartiles %s, threshold %.3e, %.1f%% of steps clipped",
                     " ".join(f"{q:.3e}" for q in quartiles), scale * quartiles[2],
                     100.0 * first["num_clipped"] / period)
            first["num_clipped"] = 0
        if "model_norm_threshold" not in first:
            return 1.0
        factor = min(1.0, float(first["model_norm_threshold"]) / (float(norm) + 1e-20))
        if factor < 1.0:
            first["num_clipped"] += 1
        if factor < 0.1:
            log.warning("clipping: gradient norm %.3e is %.1fx the threshold", float(norm),
                        1.0 / max(factor, 1e-20))
        return factor

    # ---- step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            for p in params:
                if not self.state[p]:
                    if p.grad is not None and p.grad.is_sparse:
                        raise RuntimeError("ScaledAdam does not support sparse gradients")
                    self._init_state(group, p, self.state[p])
            factor = self._clipping_factor(group, params)
            for p in params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if factor != 1.0:
                    grad = grad * factor
                self._step_one(group, p, grad, self.state[p])
        return loss

    def _step_one(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1 = group["betas"][0]
        step = state["step"]
        delta = state["delta"]
        delta.mul_(beta1)
        if p.numel() > 1:
            period = group["size_update_period"]
            # sum(p * grad) and the RMS as reductions: no full-size temporaries (the optimizer
            # is memory-bound: 122M parameters make every extra pass cost ~1 GB of traffic)
            state["scale_grads"][step % period] = torch.dot(p.reshape(-1), grad.reshape(-1))
            if step % period == period - 1:
                state["param_rms"].copy_(torch.linalg.vector_norm(p, dtype=torch.float32)
                                         / math.sqrt(p.numel()))
                if step > 0:
                    self._size_update(group, p, state)
            self._tensor_update(group, p, grad, state)
        else:
            self._scalar_update(group, p, grad, state)
        p.add_(delta)
        state["step"] = step + 1

    def _size_update(self, group: dict, p: Tensor, state: dict) -> None:
        """Learn the tensor's overall scale: a step on log(scale) every `size_update_period`."""
        beta1, beta2 = group["betas"]
        size_lr = group["lr"] * group["scalar_lr_scale"]
        scale_grads = state["scale_grads"]
        period = scale_grads.shape[0]
        beta2_corr = beta2 ** period
        avg_sq = state["scale_exp_avg_sq"]
        avg_sq.mul_(beta2_corr).add_((scale_grads ** 2).mean(), alpha=1 - beta2_corr)
        size_step = (state["step"] + 1) // period
        bias_correction2 = 1 - beta2_corr ** size_step
        denom = avg_sq.sqrt() + group["eps"]
        scale_step = -size_lr * math.sqrt(bias_correction2) * scale_grads.sum() / denom
        rms = state["param_rms"]
        scale_step = torch.where(rms < group["param_min_rms"], scale_step.clamp(min=0.0), scale_step)
        scale_step = torch.where(rms > group["param_max_rms"],
                                 torch.full_like(scale_step, -size_lr * period), scale_step)
        state["delta"].add_(p * scale_step, alpha=1 - beta1)

    def _tensor_update(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (state["step"] + 1)
        denom = exp_avg_sq.sqrt()
        if bias_correction2 < 0.99:
            denom.mul_(1.0 / math.sqrt(bias_correction2))
        denom.add_(group["eps"])
        alpha = -group["lr"] * (1 - beta1) * state["param_rms"].clamp(min=group["param_min_rms"],
                                                                      max=group["param_max_rms"])
        torch.div(grad, denom, out=denom)
        state["delta"].addcmul_(denom, alpha)

    def _scalar_update(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["scalar_lr_scale"]
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (state["step"] + 1)
        denom = (exp_avg_sq / bias_correction2).sqrt() + group["eps"]
        state["delta"].add_(grad / denom, alpha=-lr * (1 - beta1))
        p.clamp_(min=-group["scalar_max"], max=group["scalar_max"])


# --------------------------------------------------------------------------------------------
# Learning-rate schedules (set the LR of every group; stepped once per batch)
# --------------------------------------------------------------------------------------------


class LRScheduler:
    """Base: `step_batch(batch)` sets the LR for the coming update; `step_epoch(epoch)`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.base_lrs = [g["base_lr"] for g in optimizer.param_groups]
        self.batch = 0
        self.epoch = 0
        self._apply()

    def factor(self) -> float:
        raise NotImplementedError

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step_batch(self, batch: int | None = None) -> None:
        self.batch = self.batch + 1 if batch is None else batch
        self._apply()

    def step_epoch(self, epoch: int | None = None) -> None:
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"batch": self.batch, "epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, sd: dict) -> None:
        self.batch, self.epoch = int(sd["batch"]), int(sd["epoch"])
        self.base_lrs = [float(x) for x in sd["base_lrs"]]
        self._apply()


class FixedLR(LRScheduler):
    """Constant LR (the dialog recipes: 1e-4, no warm-up, no decay)."""

    def factor(self) -> float:
        return 1.0


class Eden(LRScheduler):
    """lr = base * ((b^2 + B^2)/B^2)^-0.25 * ((e^2 + E^2)/E^2)^-0.25 * warmup.

    b = batch count, B = lr_batches. The "epoch" e is either the epoch count (E = lr_epochs) or,
    when lr_hours > 0, the hours of audio seen so far (E = lr_hours; the trainer passes
    hours = b * max_duration * world_size / 3600 through `step_epoch`). Warm-up rises linearly
    from warmup_start to 1 over warmup_batches.
    """

    def __init__(self, optimizer, lr_batches: float = 7500.0, lr_epochs: float = 3.5,
                 warmup_batches: float = 500.0, warmup_start: float = 0.5):
        self.lr_batches, self.lr_epochs = float(lr_batches), float(lr_epochs)
        self.warmup_batches, self.warmup_start = float(warmup_batches), float(warmup_start)
        super().__init__(optimizer)

    def factor(self) -> float:
        b, e = float(self.batch), float(self.epoch)
        f = ((b ** 2 + self.lr_batches ** 2) / self.lr_batches ** 2) ** -0.25 * \
            ((e ** 2 + self.lr_epochs ** 2) / self.lr_epochs ** 2) ** -0.25
        if self.warmup_batches > 0 and b < self.warmup_batches:
            f *= self.warmup_start + (1.0 - self.warmup_start) * b / self.warmup_batches
        return f


def grad_scale_update(scale: float, batch_idx: int) -> float | None:
    """The fp16 recipe's rule: every 100 steps double a scale below 1024 (below 4096 on
    multiples of 400). Returns the new scale, or None when it stays."""
    if batch_idx % 100 != 0:
        return None
    if scale < 1024.0 or (scale < 4096.0 and batch_idx % 400 == 0):
        return scale * 2.0
    return None
