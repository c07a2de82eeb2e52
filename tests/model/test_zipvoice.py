"""Model pieces on hand-computed examples, a functional re-derivation of one Zipformer layer from
the fact sheet (4.2-4.5), attention-path agreement, and the training losses."""

import json
import math
from pathlib import Path

import pytest
import torch

from model.zipformer import (
    BiasNorm,
    Regularisation,
    SimpleDownsample,
    TTSZipformer,
    compact_rel_pos_table,
    simple_upsample,
    swoosh_l,
    swoosh_r,
    timestep_embedding,
)
from model.zipvoice import (
    ZipVoice,
    ZipVoiceDialog,
    ZipVoiceDialogStereo,
    average_upsample,
    average_upsample_indices,
    condition_time_mask,
    condition_time_mask_suffix,
    flow_matching_loss,
    pad_tokens,
    speaker_exclusive_loss,
    speaker_turn_rows,
    split_stereo_training_features,
)

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())["model"]
S1, S2 = 1, 2



def tiny(cls=ZipVoiceDialog, seed=0, **kw):
    torch.manual_seed(seed)
    extra = {} if cls is ZipVoice else {"spk_a_id": S1, "spk_b_id": S2}
    return cls(**TINY, vocab_size=30, pad_id=0, **extra, **kw)


# --------------------------------------------------------------------------------------------
# Text path
# --------------------------------------------------------------------------------------------


def test_pad_tokens_adds_one_trailing_pad():
    padded, lens = pad_tokens([[5, 6, 7], [8]], pad_id=0)
    assert padded.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert lens.tolist() == [3, 1]


def test_speaker_turn_parity_rule():
    # [S1] a b [S2] c [S1] d | pads ; a leading token before any marker gets row 0
    tokens = torch.tensor([[S1, 9, 9, S2, 9, S1, 9, 0, 0],
                           [7, S1, 9, S2, S2, 9, 0, 0, 0]])
    rows = speaker_turn_rows(tokens, S1, S2)
    assert rows[0, :7].tolist() == [1, 1, 1, 0, 0, 1, 1]
    # a stray repeated marker still flips the parity
    assert rows[1, :6].tolist() == [0, 1, 1, 0, 1, 1]


def test_dialog_turn_embedding_added_after_encoder_and_not_on_pads():
    model = tiny().eval()
    tokens = [[S1, 5, 6, S2, 7], [S1, 8]]
    padded, lens = pad_tokens(tokens, 0)
    with torch.no_grad():
        with_turns, _ = model.forward_text_embed(tokens)
        key_mask = torch.arange(padded.shape[1])[None] >= lens[:, None]
        encoder_only = model.text_encoder(model.embed(padded), padding_mask=key_mask)
    diff = with_turns - encoder_only
    emb = model.spk_embed.weight.detach()
    expected_rows = [[1, 1, 1, 0, 0, None], [1, 1, None, None, None, None]]  # None = pad
    for b, row in enumerate(expected_rows):
        for s, r in enumerate(row):
            target = torch.zeros(100) if r is None else emb[r]
            assert torch.allclose(diff[b, s], target, atol=1e-6), (b, s)


def test_average_upsample_remainder_goes_to_pad_slot():
    idx = average_upsample_indices(torch.tensor([3, 4, 5]), torch.tensor([10, 6, 3]), 12)
    # N=3, L=10: 3 frames per token, frame 9 (remainder) and padding 10-11 -> slot 3
    assert idx[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # N=4, L=6: 1 frame per token, frames 4-5 remainder -> slot 4
    assert idx[1].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    # fewer frames than tokens: everything reads the pad slot
    assert idx[2].tolist() == [5] * 12

    text_out = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1).expand(2, 4, 3)
    cond = average_upsample(text_out, torch.tensor([3, 2]), torch.tensor([7, 5]), 7)
    assert cond[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert cond[1, :, 0].tolist() == [4, 4, 5, 5, 6, 6, 6]


# --------------------------------------------------------------------------------------------
# Masks and losses
# --------------------------------------------------------------------------------------------


def test_suffix_mask_hand_computed():
    mask = condition_time_mask_suffix(torch.tensor([10, 7]), mask_percent=(0.5, 0.5), max_len=12)
    assert mask[0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert mask[1].nonzero().flatten().tolist() == [4, 5, 6]  # floor(0.5 * 7) = 3 frames


def test_random_masks_have_documented_shape():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(20, 200, (200,), generator=g)
    suffix = condition_time_mask_suffix(lens, (0.5, 1.0), 200, generator=g)
    span = condition_time_mask(lens, (0.7, 1.0), 200, generator=g)
    for b, L in enumerate(lens.tolist()):
        s = suffix[b].nonzero().flatten().tolist()
        assert s == list(range(L - len(s), L)) and math.floor(0.5 * L) <= len(s) <= L
        m = span[b].nonzero().flatten().tolist()
        assert m == list(range(m[0], m[0] + len(m)))  # contiguous
        assert math.floor(0.7 * L) <= len(m) <= L and m[-1] < L


def test_flow_matching_loss_counts_only_masked_frames():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [10.0, 10.0]]])
    mask = torch.tensor([[True, True, False]])
    assert flow_matching_loss(pred, target, mask).item() == pytest.approx((1 + 1 + 4 + 4) / 4)


def test_speaker_exclusive_loss_hand_computed():
    F = 2
    # ground truth energies: ch0 [0, 2], ch1 [4, 6] -> median of {0, 2, 4, 6} = 3
    gt = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0]]])
    # estimate energies: frame 0: (5, 4) both above 3 -> (2)(1) = 2; frame 1: (5, 1) -> 0
    est = torch.tensor([[[5.0, 5.0, 4.0, 4.0], [5.0, 5.0, 1.0, 1.0]]])
    both = speaker_exclusive_loss(est, gt, torch.tensor([[True, True]]), feat_dim=F)
    assert both.item() == pytest.approx(1.0)  # (2 + 0) / 2 frames
    only_first = speaker_exclusive_loss(est, gt, torch.tensor([[True, False]]), feat_dim=F)
    assert only_first.item() == pytest.approx(2.0)


def test_forward_returns_losses_and_trains_every_parameter():
    model = tiny().train()
    feats = torch.randn(2, 40, 100) * 0.3
    out = model([[S1, 5, 6, S2, 7], [S1, 8, 9]], feats, torch.tensor([40, 31]))
    assert set(out) == {"loss", "fm_loss", "num_frames"}
    assert torch.isfinite(out["loss"]) and out["num_frames"] > 0
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_condition_drop_removes_text_dependence():
    model = tiny(regularisation=Regularisation.off()).train()
    feats = torch.randn(2, 30, 100) * 0.3
    lens = torch.tensor([30, 25])
    fixed = dict(t=torch.tensor([0.3, 0.7]), noise=torch.randn(2, 30, 100),
                 speech_mask=condition_time_mask_suffix(lens, (0.6, 0.6), 30))
    a = model([[S1, 5, 6], [S1, 7]], feats, lens, condition_drop_ratio=1.0, **fixed)["loss"]
    b = model([[S1, 9, 9, 9, S2], [S1, 3, 4]], feats, lens, condition_drop_ratio=1.0, **fixed)["loss"]
    c = model([[S1, 9, 9, 9, S2], [S1, 3, 4]], feats, lens, condition_drop_ratio=0.0, **fixed)["loss"]
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_regularisation_is_controllable():
    model = tiny(regularisation=Regularisation.off())
    x = torch.randn(2, 24, 300)
    mask = torch.arange(24)[None] >= torch.tensor([[24], [17]])
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        ref = model.fm_decoder.eval()(x, t, mask)
        off = model.fm_decoder.train()(x, t, mask)
        model.reg.ff_dropout, model.reg.pos_dropout = 0.5, 0.5
        on = model.fm_decoder.train()(x, t, mask)
    assert torch.allclose(ref, off, atol=1e-6)
    assert not torch.allclose(ref, on, atol=1e-3)


def test_stereo_forward_heads_and_losses():
    model = tiny(ZipVoiceDialogStereo).train()
    lens = torch.tensor([30, 22])
    tokens = [[S1, 5, S2, 6], [S1, 7]]
    mono = model(tokens, torch.randn(2, 30, 100) * 0.3, lens)
    stereo = model(tokens, torch.randn(2, 30, 200) * 0.3, lens)
    assert mono["se_loss"].item() == 0.0 and stereo["se_loss"].item() >= 0.0
    assert torch.allclose(stereo["loss"], stereo["fm_loss"] + stereo["se_loss"])
    stereo["loss"].backward()
    assert model.fm_decoder.in_proj[0].weight.grad is not None
    assert model.fm_decoder.in_proj[1].weight.grad is None
    with pytest.raises(ValueError, match="width"):
        model(tokens, torch.randn(2, 30, 300), lens)
    both = torch.arange(300.0).expand(1, 2, 300)
    assert split_stereo_training_features(both, 0)[0, 0, 0] == 200  # even -> mix (mono head)
    assert split_stereo_training_features(both, 1).shape[-1] == 200  # odd -> [ch0 | ch1]


# --------------------------------------------------------------------------------------------
# Zipformer blocks against the fact sheet
# --------------------------------------------------------------------------------------------


def test_swoosh_constants():
    assert abs(swoosh_r(torch.tensor(0.0)).item()) < 1e-6  # SwooshR(0) = 0 by construction
    assert swoosh_r(torch.tensor(1.0)).item() == pytest.approx(math.log(2) - 0.08 - 0.313261687)
    assert swoosh_l(torch.tensor(4.0)).item() == pytest.approx(math.log(2) - 0.32 - 0.035)
    big = torch.tensor(100.0, dtype=torch.float64)
    assert swoosh_l(big).item() == pytest.approx(96 - 8 - 0.035)


def test_bias_norm_uses_bias_only_in_the_statistic():
    norm = BiasNorm(3)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        norm.log_scale.fill_(0.5)
    x = torch.tensor([[2.0, 3.0, 4.0]])
    rms = math.sqrt(((2 - 1) ** 2 + 3 ** 2 + (4 + 1) ** 2) / 3)
    assert torch.allclose(norm(x), x * math.exp(0.5) / rms)


def test_positional_table_and_time_embedding():
    T, D = 6, 48
    pe = compact_rel_pos_table(T, D)[0]
    assert pe.shape == (2 * T - 1, D) and pe.dtype == torch.float32
    zero = pe[T - 1]  # offset 0: angle 0
    assert torch.allclose(zero[0:-1:2], torch.ones(D // 2)) and torch.all(zero[1:-1:2] == 0)
    assert torch.all(pe[:, -1] == 1.0)
    assert torch.allclose(pe[:T - 1, 0:-1:2], pe[T:, 0:-1:2].flip(0))  # cosines even in offset
    d = 3.0
    c = math.sqrt(D)
    a = math.atan(c * (math.log(d + c) - math.log(c)) / (D / (2 * math.pi)))
    assert pe[T - 1 + 3, 2].item() == pytest.approx(math.cos(2 * a), abs=1e-6)
    assert pe[T - 1 - 3, 3].item() == pytest.approx(-math.sin(2 * a), abs=1e-6)

    emb = timestep_embedding(torch.tensor([0.0, 0.5], dtype=torch.float64), 192)
    assert emb.dtype == torch.float32 and emb.shape == (2, 192)
    assert torch.all(emb[0, :96] == 1) and torch.all(emb[0, 96:] == 0)  # cosines first
    assert emb[1, 1].item() == pytest.approx(math.cos(0.5 * math.exp(-math.log(10000) / 96)))


def test_downsample_upsample():
    ds = SimpleDownsample(2)
    x = torch.arange(5.0).reshape(5, 1, 1)
    y = ds(x)  # bias zeros -> equal weights; the last frame is repeated to fill the group
    assert y.flatten().tolist() == [0.5, 2.5, 4.0]
    with torch.no_grad():
        ds.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax -> [0.25, 0.75]
    assert ds(x).flatten().tolist() == pytest.approx([0.75, 2.75, 4.0])
    assert simple_upsample(y, 2, 5).flatten().tolist() == [0.5, 0.5, 2.5, 2.5, 4.0]


def _reference_layer(layer, x, pos, temb, mask):
    """One Zipformer layer written directly from the fact sheet, with loops for the position
    score (independent of the strided trick) and float64 throughout."""
    T, B, C = x.shape
    aw = layer.self_attn_weights
    H, dq, dp = aw.num_heads, aw.query_head_dim, aw.pos_head_dim
    proj = x @ aw.in_proj.weight.T + aw.in_proj.bias
    q, k, p = proj[..., :H * dq], proj[..., H * dq:2 * H * dq], proj[..., 2 * H * dq:]
    R = pos[0] @ aw.linear_pos.weight.T  # (2T-1, H*dp)
    A = torch.zeros(H, B, T, T, dtype=x.dtype)
    for h in range(H):
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    s = q[i, b, h * dq:(h + 1) * dq] @ k[j, b, h * dq:(h + 1) * dq]
                    s = s + p[i, b, h * dp:(h + 1) * dp] @ R[j - i + T - 1, h * dp:(h + 1) * dp]
                    A[h, b, i, j] = -1000.0 if mask[b, j] else s
    A = A.softmax(-1)

    def lin(m, y):
        return y @ m.weight.T + m.bias

    def island(f, y):  # the fused activation+linear evaluates its Swoosh in float32
        return f(y.float()).to(y.dtype)

    def ff(m, y):
        return lin(m.out_proj, island(swoosh_l, lin(m.in_proj, y)))

    def sa(m, y):
        v = lin(m.in_proj, y).reshape(T, B, H, -1).permute(2, 1, 0, 3)
        return lin(m.out_proj, (A @ v).permute(2, 1, 0, 3).reshape(T, B, -1))

    def na(m, y):
        s, xx, yy = lin(m.in_proj, y).chunk(3, -1)
        xx = (xx * s.tanh()).permute(1, 0, 2)  # (B, T, hid)
        return lin(m.out_proj, (A[0] @ xx).permute(1, 0, 2) * yy)

    def conv(m, y):
        xx, g = lin(m.in_proj, y).chunk(2, -1)
        xx = (xx * g.sigmoid()).masked_fill(mask.T[..., None], 0.0)
        xx = torch.nn.functional.conv1d(xx.permute(1, 2, 0), m.depthwise_conv.weight,
                                        m.depthwise_conv.bias, padding=m.depthwise_conv.padding,
                                        groups=C).permute(2, 0, 1)
        return lin(m.out_proj, island(swoosh_r, xx))

    x0 = x
    x = x + temb
    x = x + ff(layer.feed_forward1, x)
    x = x + na(layer.nonlin_attention, x)
    x = x + sa(layer.self_attn1, x)
    x = x + temb
    x = x + conv(layer.conv_module1, x)
    x = x + ff(layer.feed_forward2, x)
    x = x0 + (x - x0) * layer.bypass_mid.bypass_scale
    x = x + sa(layer.self_attn2, x)
    x = x + temb
    x = x + conv(layer.conv_module2, x)
    x = x + ff(layer.feed_forward3, x)
    n = layer.norm
    x = x * n.log_scale.exp() / ((x - n.bias) ** 2).mean(-1, keepdim=True).sqrt()
    return x0 + (x - x0) * layer.bypass.bypass_scale


def _randomise(module):
    """Move every weight away from its init so that no term can hide behind a zero or a 0.5."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + 0.1)


def test_layer_matches_fact_sheet_derivation_float64():
    model = tiny().double().eval()
    layer = model.fm_decoder.encoders[0].layers[0]
    _randomise(layer)
    T, B, C = 7, 2, 32
    x = torch.randn(T, B, C, dtype=torch.float64)
    temb = torch.randn(B, C, dtype=torch.float64)
    mask = torch.arange(T)[None] >= torch.tensor([[7], [4]])
    pos = compact_rel_pos_table(T, 16).double()
    with torch.no_grad():
        ours = layer(x, pos, temb, mask)
        ref = _reference_layer(layer, x, pos, temb, mask)
        ours_sdpa = layer(x, pos, temb, mask, use_sdpa=True)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)
    assert torch.allclose(ours_sdpa, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_sdpa_path_agrees_with_explicit_path(dtype, atol):
    model = tiny(ZipVoiceDialog).to(dtype).eval()
    _randomise(model.fm_decoder)
    B, T = 3, 45
    x = torch.randn(B, T, 300, dtype=dtype)
    mask = torch.arange(T)[None] >= torch.tensor([[45], [30], [13]])
    t = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)
    tokens = [[S1, 5, 6, S2, 7, 8], [S1, 4], [S1, 9, 9, S2]]
    with torch.no_grad():
        model.set_attention_backend("explicit")
        v_exp = model.fm_decoder(x, t, mask)
        txt_exp = model.forward_text_embed(tokens)[0]
        model.set_attention_backend("sdpa")
        v_sdpa = model.fm_decoder(x, t, mask)
        txt_sdpa = model.forward_text_embed(tokens)[0]
    scale = v_exp.abs().max().item()
    assert (v_exp - v_sdpa).abs().max().item() <= atol * max(1.0, scale)
    assert (txt_exp - txt_sdpa).abs().max().item() <= atol * max(1.0, txt_exp.abs().max().item())
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("flash")


def test_decoder_ignores_padding_content_beyond_downsample_groups():
    """Padded keys are masked: changing padded frames (beyond the last group that mixes in a
    real frame) must not change the outputs at real frames."""
    dec: TTSZipformer = tiny().fm_decoder.double().eval()
    T, L = 40, 24  # L divisible by 4: no downsample group mixes real and padded frames
    x = torch.randn(1, T, 300, dtype=torch.float64)
    x2 = x.clone()
    x2[:, L:] = torch.randn(1, T - L, 300, dtype=torch.float64) * 5
    mask = torch.arange(T)[None] >= L
    with torch.no_grad():
        a = dec(x, torch.tensor([0.4]), mask)[:, :L]
        b = dec(x2, torch.tensor([0.4]), mask)[:, :L]
        c = dec(x2, torch.tensor([0.4]), None)[:, :L]
    assert torch.allclose(a, b, atol=1e-10)
    assert not torch.allclose(a, c, atol=1e-4)


def test_constant_attention_and_layer_skip_in_training():
    reg = Regularisation.off()
    model = tiny(regularisation=reg)
    stack = model.fm_decoder.encoders[0]  # an unwrapped stack (ds = 1)
    T, B = 9, 2
    x = torch.randn(T, B, 32)
    mask = torch.arange(T)[None] >= torch.tensor([[9], [5]])
    pos = compact_rel_pos_table(T, 16)
    reg.const_attention_rate = 1.0
    attn = stack.layers[0].self_attn_weights.train()(x, pos, mask, reg=reg)
    w = attn.const_head0[0]  # uniform over the unmasked keys of each sequence
    assert torch.allclose(w[0], torch.full((T, T), 1 / 9))
    assert torch.allclose(w[1, :, :5], torch.full((T, 5), 1 / 5)) and torch.all(w[1, :, 5:] == 0)
    reg.const_attention_rate = 0.0
    reg.layer_skip_rate = 1.0  # every layer skipped: an unwrapped stack returns its input
    stack.train()
    with torch.no_grad():
        assert torch.equal(stack(x, torch.randn(B, 16), mask), x)
        stack.eval()
        assert not torch.allclose(stack(x, torch.randn(B, 16), mask), x)
