"""Distillation of a flow-matching model into a few-step one (ZipVoice-Distill recipe, fact sheet 6.5).

The student is the teacher's architecture plus `fm_decoder.guidance_scale_embed`: it takes the
guidance scale w as an input, so sampling needs no CFG double pass, and it learns to cover in one
Euler step what the teacher covers in two. Each training step:

  1. one t ~ U(0, 1) for the batch, d1 ~ U(0, min(0.3, 1 - t)), d2 ~ U(0, min(0.3, 1 - t - d1)),
     w ~ U(0, 2) per utterance (stage "first") or U(1, 3) (stage "second");
  2. x_t = t x1 + (1 - t) x0 with the model's own prompt mask (suffix for dialog models);
  3. the teacher takes two Euler steps t -> t + d1 -> t + d1 + d2; its implied velocity is
     (x_end - x_t) / (d1 + d2) = (d1 v1 + d2 v2) / (d1 + d2), written in the second form so a
     tiny d1 + d2 cannot blow it up;
  4. loss = mean squared difference between the student's velocity at (t, x_t, w) and that target
     on the generated frames (prompt and padding excluded).

Stage "first": the teacher is the fixed many-step model (ZipVoice-Dialog, -Stereo or ZipVoice)
run with CFG at scale w. Stage "second": the teacher is an EMA (decay 0.9999) of the student,
started from the stage-1 result, which sharpens the student on its own few-step trajectories.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from model.sampling import guided_velocity, sample
from model.zipvoice import ZipVoice, flow_matching_loss, lengths_to_padding_mask

DistillStage = Literal["first", "second"]
# Guidance scales drawn per utterance: (low, high) of the uniform distribution.
GUIDANCE_RANGE = {"first": (0.0, 2.0), "second": (1.0, 3.0)}
MAX_STEP = 0.3


def teacher_target(teacher: ZipVoice, t: float, d1: float, d2: float, xt: Tensor,
                   text_condition: Tensor, speech_condition: Tensor, padding_mask: Tensor,
                   w: Tensor) -> Tensor:
    """The velocity implied by two teacher Euler steps t -> t + d1 -> t + d1 + d2 from x_t."""
    v1 = guided_velocity(teacher, t, xt, text_condition, speech_condition, padding_mask, w)
    if d1 + d2 <= 0.0:
        return v1
    x_mid = xt + v1.to(xt.dtype) * d1
    v2 = guided_velocity(teacher, t + d1, x_mid, text_condition, speech_condition, padding_mask, w)
    return (v1.float() * d1 + v2.float() * d2) / (d1 + d2)


class DistillObjective(nn.Module):
    """Student + teacher with the trainer's model interface: forward(tokens, features, lens) ->
    {"loss", "fm_loss", "num_frames"}. `fm_loss` is the student's plain flow-matching loss
    against x1 - x0 (a progress indicator only: nothing is trained on it)."""

    def __init__(self, student: ZipVoice, teacher: ZipVoice, stage: DistillStage = "first",
                 ema_decay: float = 0.9999):
        super().__init__()
        if not student.distilled:
            raise ValueError("the student must have a guidance-scale embedding (a *_distill model)")
        if stage == "second" and not teacher.distilled:
            raise ValueError("stage 'second' distils from an EMA of the (distilled) student")
        if stage not in GUIDANCE_RANGE:
            raise ValueError(f"unknown distill stage {stage!r}: 'first' or 'second'")
        self.student, self.teacher = student, teacher
        self.stage, self.ema_decay = stage, ema_decay
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @classmethod
    def with_ema_teacher(cls, student: ZipVoice, ema_decay: float = 0.9999) -> "DistillObjective":
        return cls(student, copy.deepcopy(student), "second", ema_decay)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never runs its training-time randomness
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Stage "second": teacher <- decay * teacher + (1 - decay) * student (every update)."""
        if self.stage != "second":
            return
        for t, s in zip(self.teacher.state_dict().values(), self.student.state_dict().values()):
            if t.is_floating_point():
                t.mul_(self.ema_decay).add_(s.detach().to(t.dtype), alpha=1.0 - self.ema_decay)

    def forward(self, tokens: list[list[int]], features: Tensor, features_lens: Tensor, *,
                noise: Tensor | None = None, speech_mask: Tensor | None = None,
                generator: torch.Generator | None = None, condition_drop_ratio: float = 0.0,
                **_ignored) -> dict:
        """features: (B, T, F') scaled by 0.1 (F' = 2F for a stereo step: the decoder picks its
        head from the width). `generator` (CPU) makes t, d1, d2, w and noise reproducible.
        The text condition is never dropped here: the student is conditioned on w instead."""
        del condition_drop_ratio
        B, T, _ = features.shape
        dev = features.device
        lens = features_lens.to(dev)

        def uniform(lo: float, hi: float, n: int | None = None):
            u = torch.rand(() if n is None else (n,), generator=generator)
            return lo + (hi - lo) * (float(u) if n is None else u.to(dev))

        t = uniform(0.0, 1.0)
        d1 = uniform(0.0, min(MAX_STEP, 1.0 - t))
        d2 = uniform(0.0, max(0.0, min(MAX_STEP, 1.0 - t - d1)))
        w = uniform(*GUIDANCE_RANGE[self.stage], n=B)
        if noise is None:
            noise = torch.randn(features.shape, generator=generator).to(dev, features.dtype)
        if speech_mask is None:
            speech_mask = self.student.speech_condition_mask(lens.cpu(), T, generator).to(dev)
        padding_mask = lengths_to_padding_mask(lens, T)
        x1 = features
        xt = t * x1 + (1.0 - t) * noise
        speech_condition = x1.masked_fill(speech_mask.unsqueeze(-1), 0.0)

        with torch.no_grad():
            target = teacher_target(
                self.teacher, t, d1, d2, xt, self.teacher.forward_text_condition(tokens, lens, T),
                speech_condition, padding_mask, w.reshape(B, 1, 1))
        text_condition = self.student.forward_text_condition(tokens, lens, T)
        v = self.student.forward_fm_decoder(t, xt, text_condition, speech_condition, padding_mask, w)
        loss_mask = speech_mask & ~padding_mask
        loss = flow_matching_loss(v, target, loss_mask)
        with torch.no_grad():
            fm = flow_matching_loss(v, x1 - noise, loss_mask)
        return {"loss": loss, "fm_loss": fm, "num_frames": loss_mask.sum()}


@torch.no_grad()
def few_step_gap(student: ZipVoice, teacher: ZipVoice, tokens: list[list[int]],
                 prompt_tokens: list[list[int]], prompt_features: Tensor, prompt_lens: Tensor,
                 target_frames: list[int], *, student_steps: int = 4, teacher_steps: int = 16,
                 guidance_scale: float = 1.5, seed: int = 0) -> float:
    """Mean squared difference between the student's few-step and the teacher's many-step
    generations (same prompts, lengths and starting noise): what distillation should shrink."""
    outs = []
    for model, steps in ((student, student_steps), (teacher, teacher_steps)):
        feats, lens = sample(model, tokens, prompt_tokens, prompt_features, prompt_lens,
                             num_step=steps, guidance_scale=guidance_scale,
                             target_frames=target_frames,
                             generator=torch.Generator().manual_seed(seed))
        outs.append((feats, lens))
    (a, lens), (b, _) = outs
    mask = lengths_to_padding_mask(lens, a.shape[1]).logical_not().unsqueeze(-1).to(a.dtype)
    return float(((a.float() - b.float()) ** 2 * mask).sum() / (mask.sum() * a.shape[-1]))
