"""Sampling: duration rule, Euler solver on the shifted time grid, time-dependent CFG, chunking.

Facts from `../shared/docs/zipvoice-reference.md` section 6. All features are scaled by 0.1
(the caller divides the output by 0.1 before the vocoder). Stereo models are sampled the same way
with 2F-wide prompt features ([ch0 | ch1]); the decoder picks its head from the input width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.zipvoice import ZipVoice, lengths_to_padding_mask

FRAME_RATE = 24000 / 256  # 93.75 frames per second


def time_grid(num_step: int, t_shift: float = 0.5, device=None) -> Tensor:
    """t_i = s tau_i / (1 + (s - 1) tau_i) with tau_i = i / n, i = 0..n (float32).

    s < 1 puts more steps near the noise end (t = 0); s = 0.5 gives t = tau / (2 - tau).
    """
    if num_step < 1:
        raise ValueError(f"num_step must be >= 1, got {num_step}")
    tau = torch.linspace(0.0, 1.0, num_step + 1, device=device, dtype=torch.float32)
    return t_shift * tau / (1.0 + (t_shift - 1.0) * tau)


def cfg_mode(t: float, guidance_scale):
    """(uncond branch keeps the speech prompt?, effective scale) for the time-dependent CFG.

    For t <= 0.5 the unconditional branch drops only the text and the scale is doubled; for
    t > 0.5 it drops text and speech prompt and the scale is used as given. The scale may be a
    float or a per-utterance tensor (B, 1, 1).
    """
    if float(t) > 0.5:
        return False, guidance_scale
    return True, 2.0 * guidance_scale


def guided_velocity(model: ZipVoice, t: float | Tensor, xt: Tensor, text_condition: Tensor,
                    speech_condition: Tensor, padding_mask: Tensor | None,
                    guidance_scale: float | Tensor) -> Tensor:
    """The velocity the sampler follows.

    Distilled models take the guidance scale as an input (one pass). Others run CFG:
    v = (1 + w) v_cond - w v_uncond with the batch doubled as [uncond, cond] (w = 0: no CFG);
    w is a float or a per-utterance tensor (B, 1, 1).
    """
    if getattr(model, "distilled", False):
        w = guidance_scale if torch.is_tensor(guidance_scale) else torch.tensor(
            float(guidance_scale), device=xt.device)
        return model.forward_fm_decoder(t, xt, text_condition, speech_condition, padding_mask,
                                        w.reshape(-1))
    if not torch.is_tensor(guidance_scale) and guidance_scale == 0.0:
        return model.forward_fm_decoder(t, xt, text_condition, speech_condition, padding_mask)
    keep_speech, w = cfg_mode(float(t), guidance_scale)
    uncond_speech = speech_condition if keep_speech else torch.zeros_like(speech_condition)
    v_uncond, v_cond = model.forward_fm_decoder(
        t,
        torch.cat([xt, xt]),
        torch.cat([torch.zeros_like(text_condition), text_condition]),
        torch.cat([uncond_speech, speech_condition]),
        None if padding_mask is None else torch.cat([padding_mask, padding_mask]),
    ).chunk(2, dim=0)
    return (1.0 + w) * v_cond - w * v_uncond


def euler_solve(model: ZipVoice, x0: Tensor, text_condition: Tensor, speech_condition: Tensor,
                padding_mask: Tensor | None, num_step: int = 16, guidance_scale: float = 1.5,
                t_shift: float = 0.5) -> Tensor:
    """Integrate dx/dt = v from t = 0 (noise) to t = 1 (data): x <- x + v(t_i) (t_{i+1} - t_i)."""
    ts = time_grid(num_step, t_shift, x0.device)
    x = x0
    for i in range(num_step):
        v = guided_velocity(model, ts[i], x, text_condition, speech_condition, padding_mask,
                            guidance_scale)
        x = x + v.to(x.dtype) * (ts[i + 1] - ts[i])
    return x


def predict_num_frames(prompt_frames, num_prompt_tokens, num_target_tokens, speed: float = 1.0):
    """Generated frames = ceil(P / N_prompt * N_target / speed): the prompt's token rate.

    Computed as the reference does, by true division of int64 tensors, i.e. in float32 with a
    rounding after each operation (float64 lands on the other side of a whole number for about
    0.25 % of inputs: P=16, N_prompt=7, N_target=21 gives 49 frames here, 48 in float64).
    Takes ints (returns an int) or int64 tensors of a batch (returns an int64 tensor).
    """
    batched = torch.is_tensor(prompt_frames)
    p, n_p, n_t = (torch.as_tensor(v, dtype=torch.int64)
                   for v in (prompt_frames, num_prompt_tokens, num_target_tokens))
    if bool((n_p <= 0).any()):
        raise ValueError("the prompt has no tokens: cannot estimate the speaking rate")
    frames = torch.ceil(p / n_p * n_t / speed).to(torch.int64)
    return frames if batched else int(frames)


@torch.inference_mode()
def sample(model: ZipVoice, tokens: list[list[int]], prompt_tokens: list[list[int]],
           prompt_features: Tensor, prompt_features_lens: Tensor, *, speed: float = 1.0,
           num_step: int = 16, guidance_scale: float = 1.5, t_shift: float = 0.5,
           target_frames: list[int] | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Generate the features that continue each prompt with its target text.

    prompt_features: (B, P_max, F') scaled by 0.1 (F' = 2F for the stereo head);
    prompt_features_lens: (B,). Prompt and target tokens are encoded jointly. The generated length
    comes from the duration rule unless `target_frames` is given. Returns (features (B, T, F')
    with the prompt frames cut away, lengths (B,)).
    """
    device = prompt_features.device
    B = len(tokens)
    if not (len(prompt_tokens) == B == prompt_features.shape[0]):
        raise ValueError("tokens, prompt_tokens and prompt_features must have the same batch size")
    p_lens = [int(x) for x in prompt_features_lens]
    if target_frames is None:
        target_frames = predict_num_frames(
            torch.tensor(p_lens), torch.tensor([len(pt) for pt in prompt_tokens]),
            torch.tensor([len(tt) for tt in tokens]), speed).tolist()
    total = torch.tensor([p + d for p, d in zip(p_lens, target_frames)], device=device)
    T = int(total.max())
    text_condition = model.forward_text_condition(
        [pt + tt for pt, tt in zip(prompt_tokens, tokens)], total, T)
    # The prompt sits in the speech condition; the rest is to be generated.
    speech_condition = torch.zeros(B, T, prompt_features.shape[-1], device=device,
                                   dtype=prompt_features.dtype)
    for b, p in enumerate(p_lens):
        speech_condition[b, :p] = prompt_features[b, :p]
    padding_mask = lengths_to_padding_mask(total, T)
    x0 = torch.randn(speech_condition.shape, generator=generator).to(device, speech_condition.dtype)
    x1 = euler_solve(model, x0, text_condition, speech_condition, padding_mask, num_step,
                     guidance_scale, t_shift)
    out = torch.zeros(B, max(target_frames), x1.shape[-1], device=device, dtype=x1.dtype)
    for b, (p, d) in enumerate(zip(p_lens, target_frames)):
        out[b, :d] = x1[b, p: p + d]
    return out, torch.tensor(target_frames, device=device)


# --------------------------------------------------------------------------------------------
# Long dialogues
# --------------------------------------------------------------------------------------------


def max_chunk_tokens(prompt_seconds: float, num_prompt_tokens: int, speed: float = 1.0,
                     max_seconds: float = 40.0) -> int:
    """Target tokens that fit with the prompt in `max_seconds`: int((max - P) / token_dur)."""
    token_seconds = prompt_seconds / (num_prompt_tokens * speed)
    return int((max_seconds - prompt_seconds) / token_seconds)


def split_dialogue(tokens: list[int], spk_a_id: int, max_tokens: int) -> list[list[int]]:
    """Split at every [S1] token, then greedily merge consecutive pieces up to max_tokens.

    Each chunk therefore starts with [S1] (if the text does). A single turn longer than
    max_tokens stays one chunk.
    """
    pieces: list[list[int]] = []
    for tok in tokens:
        if tok == spk_a_id or not pieces:
            pieces.append([])
        pieces[-1].append(tok)
    chunks: list[list[int]] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + len(piece) <= max_tokens:
            chunks[-1] = chunks[-1] + piece
        else:
            chunks.append(list(piece))
    return chunks


def cross_fade(waves: list[Tensor], sampling_rate: int = 24000, fade_seconds: float = 0.1) -> Tensor:
    """Join waveforms (..., N_i) in order with a linear cross-fade of fade_seconds."""
    if not waves:
        raise ValueError("nothing to join")
    out = waves[0]
    for w in waves[1:]:
        n = min(int(round(fade_seconds * sampling_rate)), out.shape[-1], w.shape[-1])
        if n == 0:
            out = torch.cat([out, w], dim=-1)
            continue
        ramp = torch.linspace(0.0, 1.0, n, dtype=out.dtype, device=out.device)
        mixed = out[..., -n:] * (1.0 - ramp) + w[..., :n] * ramp
        out = torch.cat([out[..., :-n], mixed, w[..., n:]], dim=-1)
    return out


def generate_long(model: ZipVoice, prompt_tokens: list[int], prompt_features: Tensor,
                  tokens: list[int], *, split_token_id: int | None = None,
                  max_seconds: float = 40.0, batch_seconds: float = 100.0, speed: float = 1.0,
                  num_step: int = 16, guidance_scale: float = 1.5, t_shift: float = 0.5,
                  generator: torch.Generator | None = None) -> list[Tensor]:
    """Features (T_i, F') for each chunk of a long text, in text order, all with the same prompt.

    The text is split at `split_token_id` ([S1]) into chunks of at most max_seconds with the
    prompt; chunks are sorted by length and batched up to batch_seconds of prompt + target.
    With split_token_id None the text is one chunk.
    """
    P = prompt_features.shape[0]
    prompt_seconds = P / FRAME_RATE
    token_seconds = prompt_seconds / (len(prompt_tokens) * speed)
    if split_token_id is None:
        chunks = [tokens]
    else:
        budget = max(1, max_chunk_tokens(prompt_seconds, len(prompt_tokens), speed, max_seconds))
        chunks = split_dialogue(tokens, split_token_id, budget)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    batches, current, seconds = [], [], 0.0
    for i in order:
        item = prompt_seconds + len(chunks[i]) * token_seconds
        if current and seconds + item > batch_seconds:
            batches.append(current)
            current, seconds = [], 0.0
        current.append(i)
        seconds += item
    batches.append(current)

    results: list[Tensor | None] = [None] * len(chunks)
    for batch in batches:
        n = len(batch)
        feats, lens = sample(
            model, [chunks[i] for i in batch], [prompt_tokens] * n,
            prompt_features.unsqueeze(0).expand(n, -1, -1),
            torch.full((n,), P, device=prompt_features.device), speed=speed, num_step=num_step,
            guidance_scale=guidance_scale, t_shift=t_shift, generator=generator)
        for j, i in enumerate(batch):
            results[i] = feats[j, : int(lens[j])]
    return results
