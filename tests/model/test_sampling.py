"""Sampling: time grid, CFG schedule, Euler solver, duration rule, chunking, cross-fade."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.sampling import (
    cfg_mode,
    cross_fade,
    euler_solve,
    generate_long,
    guided_velocity,
    max_chunk_tokens,
    predict_num_frames,
    sample,
    split_dialogue,
    time_grid,
)
from model.zipvoice import ZipVoiceDialog, ZipVoiceDialogStereo

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())["model"]
S1, S2 = 1, 2



def tiny(cls=ZipVoiceDialog):
    torch.manual_seed(0)
    return cls(**TINY, vocab_size=20, pad_id=0, spk_a_id=S1, spk_b_id=S2).eval()


def test_time_grid_is_shifted_towards_noise():
    ts = time_grid(16, 0.5)
    assert ts.shape == (17,) and ts[0] == 0 and ts[-1] == 1
    for i, t in enumerate(ts.tolist()):
        tau = i / 16
        assert t == pytest.approx(tau / (2 - tau), abs=1e-7)
    assert torch.all(ts[1:] > ts[:-1])
    assert time_grid(4, 1.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]  # s = 1: no shift


def test_cfg_schedule_for_16_steps():
    ts = time_grid(16, 0.5)[:-1]
    modes = [cfg_mode(float(t), 1.5) for t in ts]
    doubled = [i for i, (keep_speech, w) in enumerate(modes) if keep_speech and w == 3.0]
    full = [i for i, (keep_speech, w) in enumerate(modes) if not keep_speech and w == 1.5]
    assert doubled == list(range(0, 11)) and full == list(range(11, 16))
    assert ts[10] < 0.5 < ts[11] and ts[11].item() == pytest.approx(0.5238, abs=1e-4)


class FakeModel:
    """v = a * x_t + text + 10 * speech, elementwise: the CFG combination can be computed by hand."""

    def __init__(self, a=0.0):
        self.a = a
        self.calls = []

    def forward_fm_decoder(self, t, xt, text, speech, mask):
        self.calls.append((float(t), xt.shape[0]))
        return self.a * xt + text + 10 * speech


def test_guided_velocity_switches_at_half():
    xt, text, speech = torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 2.0)
    m = FakeModel()
    w = 1.5
    # t <= 0.5: uncond keeps speech (v_u = 20), cond = 21; scale doubled: (1+3)*21 - 3*20 = 24
    assert torch.allclose(guided_velocity(m, 0.5, xt, text, speech, None, w), torch.full_like(xt, 24.0))
    # t > 0.5: uncond drops both (v_u = 0): (1+1.5)*21 = 52.5
    assert torch.allclose(guided_velocity(m, 0.6, xt, text, speech, None, w), torch.full_like(xt, 52.5))
    # w = 0: one plain conditional call, no batch doubling
    assert torch.allclose(guided_velocity(m, 0.6, xt, text, speech, None, 0.0), torch.full_like(xt, 21.0))
    assert [b for _, b in m.calls] == [2, 2, 1]


def test_euler_solver_integrates_on_the_grid():
    x0 = torch.randn(2, 5, 3)
    zeros = torch.zeros_like(x0)
    # constant velocity c: x1 = x0 + c exactly
    const = FakeModel(a=0.0)
    x1 = euler_solve(const, x0, torch.ones_like(x0), zeros, None, num_step=7, guidance_scale=0.0)
    assert torch.allclose(x1, x0 + 1.0, atol=1e-6)
    # v = x: x1 = x0 * prod(1 + dt_i) (explicit Euler)
    lin = FakeModel(a=1.0)
    x1 = euler_solve(lin, x0, zeros, zeros, None, num_step=4, guidance_scale=0.0, t_shift=0.5)
    ts = time_grid(4, 0.5)
    factor = math.prod(1 + float(ts[i + 1] - ts[i]) for i in range(4))
    assert torch.allclose(x1, x0 * factor, atol=1e-6)
    assert [t for t, _ in lin.calls] == pytest.approx(ts[:-1].tolist())


def test_duration_rule():
    assert predict_num_frames(100, 20, 30) == 150
    assert predict_num_frames(100, 20, 30, speed=1.5) == 100
    assert predict_num_frames(100, 30, 10) == 34  # ceil(33.3)
    # float32 semantics of the reference's int64 tensor division (float64 gives 48 and 55)
    assert predict_num_frames(16, 7, 21) == 49
    assert predict_num_frames(18, 7, 21) == 54
    with pytest.raises(ValueError, match="no tokens"):
        predict_num_frames(100, 0, 10)


def _reference_frames(p, n_prompt, n_target, speed):
    """The reference's expression on int64 tensors, written out here independently."""
    return torch.ceil((torch.tensor([p]) / torch.tensor([n_prompt]) * torch.tensor([n_target])
                       / speed)).to(dtype=torch.int64).item()


def test_duration_rule_matches_int64_tensor_division_on_a_grid():
    cases = [(p, n_p, n_t, s) for p in range(1, 400, 7) for n_p in range(1, 60, 4)
             for n_t in (1, 5, 21, 50, 133) for s in (1.0, 0.8, 1.3)]
    ours = [predict_num_frames(*c) for c in cases]
    assert ours == [_reference_frames(*c) for c in cases]
    # the grid holds cases where float64 lands on the other side of a whole number
    f64 = [math.ceil(p / n_p * n_t / s) for p, n_p, n_t, s in cases]
    assert sum(a != b for a, b in zip(ours, f64)) > 0
    # the batched form gives the same frames
    p, n_p, n_t, _ = map(list, zip(*[c for c in cases if c[3] == 1.3]))
    batched = predict_num_frames(torch.tensor(p), torch.tensor(n_p), torch.tensor(n_t), 1.3)
    assert batched.dtype == torch.int64
    assert batched.tolist() == [o for o, c in zip(ours, cases) if c[3] == 1.3]


def test_sample_cuts_the_prompt_and_follows_the_duration_rule():
    model = tiny()
    prompt = torch.randn(2, 30, 100) * 0.3
    feats, lens = sample(model, [[S1, 5, 6, 7], [S1, 8]], [[S1, 3, S2, 4], [S1, 9, S2]],
                         prompt, torch.tensor([30, 21]), num_step=3,
                         generator=torch.Generator().manual_seed(0))
    assert lens.tolist() == [30, 14]  # ceil(30/4*4), ceil(21/3*2)
    assert feats.shape == (2, 30, 100) and torch.isfinite(feats).all()
    assert torch.all(feats[1, 14:] == 0)
    again, _ = sample(model, [[S1, 5, 6, 7], [S1, 8]], [[S1, 3, S2, 4], [S1, 9, S2]],
                      prompt, torch.tensor([30, 21]), num_step=3,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(feats, again)
    fixed, lens = sample(model, [[5]], [[S1, 3]], prompt[:1], torch.tensor([30]), num_step=2,
                         target_frames=[11])
    assert fixed.shape == (1, 11, 100)


def test_stereo_sampling_is_200_wide():
    model = tiny(ZipVoiceDialogStereo)
    feats, lens = sample(model, [[S1, 5, S2, 6]], [[S1, 3, S2]], torch.randn(1, 24, 200) * 0.3,
                         torch.tensor([24]), num_step=2)
    assert feats.shape == (1, 32, 200) and lens.tolist() == [32]


def test_split_dialogue_at_s1_with_greedy_merge():
    toks = [S1, 5, S2, 6, S1, 7, 7, 7, S2, 8, S1, 9, S1, 4, 4, 4, 4, 4, 4, 4]
    # pieces at [S1]: 4, 6, 2, 8 tokens; budget 9: 4+6 > 9, 6+2 merge, 8+8 > 9
    chunks = split_dialogue(toks, S1, 9)
    assert chunks == [toks[0:4], toks[4:12], toks[12:]]
    assert split_dialogue(toks, S1, 5) == [toks[0:4], toks[4:10], toks[10:12], toks[12:]]
    assert all(c[0] == S1 for c in chunks) and sum(map(len, chunks)) == len(toks)
    assert split_dialogue(toks, S1, 100) == [toks]
    assert max_chunk_tokens(8.0, 64) == 256  # token_dur 0.125 s, (40 - 8) / 0.125
    assert max_chunk_tokens(8.0, 64, speed=2.0) == 512


def test_cross_fade_is_linear():
    a, b = torch.ones(1, 50), torch.zeros(1, 40)
    out = cross_fade([a, b], sampling_rate=100, fade_seconds=0.1)  # 10-sample overlap
    assert out.shape == (1, 80)
    assert torch.all(out[0, :40] == 1) and torch.all(out[0, 50:] == 0)
    assert torch.allclose(out[0, 40:50], torch.linspace(1, 0, 10))
    three = cross_fade([a, b, a], sampling_rate=100)
    assert three.shape == (1, 120)


def test_generate_long_splits_and_keeps_text_order():
    model = tiny()
    prompt_tokens = [S1, 3, 3, S2, 4, 4, 4, 4]
    prompt = torch.randn(16, 100) * 0.3  # 16 frames -> 2 frames per token
    tokens = [S1, 5, 5, S2, 6, S1, 7, S2, 7, 7, 7, 7, S1, 8]
    prompt_seconds = 16 / 93.75
    max_seconds = 2.05 * prompt_seconds  # room for 8.4 -> 8 target tokens
    assert max_chunk_tokens(prompt_seconds, 8, 1.0, max_seconds) == 8
    # batch_seconds 0.5 puts the two shorter chunks in one batch and the longest in another
    chunks = generate_long(model, prompt_tokens, prompt, tokens, split_token_id=S1,
                           max_seconds=max_seconds, num_step=2, batch_seconds=0.5,
                           generator=torch.Generator().manual_seed(0))
    # pieces: 5, 7, 2 tokens -> three chunks with an 8-token budget (5+7 > 8, 7+2 > 8)
    assert [c.shape[0] for c in chunks] == [10, 14, 4]
    single = generate_long(model, prompt_tokens, prompt, tokens, split_token_id=None, num_step=2)
    assert len(single) == 1 and single[0].shape[0] == 2 * len(tokens)
