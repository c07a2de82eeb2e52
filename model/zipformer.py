"""TTSZipformer: the text encoder and flow-matching decoder of ZipVoice.

Written from the facts of `../shared/docs/zipvoice-reference.md` (sections 3-4). Module and
parameter names are those of the reference so that an official `model.pt` loads with
`load_state_dict(strict=True)` and no key remapping.

Layout inside the network is time-first, (T, B, C), like the reference; `TTSZipformer.forward`
takes and returns batch-first (B, T, C).

Eval-mode forward math follows the reference exactly:
  * float32 islands: the time sinusoid, the positional table and the Swoosh inside the fused
    activation+linear modules are computed in float32 whatever the model dtype;
  * attention scores have no 1/sqrt(d) scaling, padded keys are filled with -1000 (not -inf),
    the position score is indexed by key index minus query index;
  * the compact positional table has its last column overwritten with 1;
  * the convolution module zeroes padded frames before the depthwise conv;
  * the 13-step layer order of section 4.2.

Left out (train-time-only, identity in the forward pass, section 4.6): Balancer, Whiten, the
attention-score penalty, limit_param_value, the Identity diagnostics hooks and the
memory-saving autograd functions. ScheduledFloat schedules are replaced by constants held in a
`Regularisation` object (defaults = the values the dialog fine-tuning runs at). The training-time
stochastic forward (layer skip, sequence dropout of sub-modules, constant attention, position
score skip, positional-table dropout, shared-over-time FF dropout) is approximated from 4.6 and
is active only in `.train()` mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Activations and small modules
# --------------------------------------------------------------------------------------------


def _swoosh(x: Tensor, shift: float, offset: float) -> Tensor:
    return torch.logaddexp(x.new_zeros(()), x - shift) - 0.08 * x - offset


class _SwooshFunction(torch.autograd.Function):
    """softplus(z - shift) - 0.08 z - offset with a hand-written backward.

    Autograd through the plain expression keeps four full-size intermediates per call and runs
    the logaddexp backward; the activations sit on the widest tensors of every layer (the
    feedforward hidden units), so the training step spends noticeably less time and memory
    saving only the input and computing sigmoid(z - shift) - 0.08 in the backward. The forward
    values are those of the plain expression, bit for bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shift: float, offset: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.shift = shift
        return _swoosh(x, shift, offset)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        d = (x - ctx.shift).sigmoid_().sub_(0.08)
        return d.mul_(grad), None, None


def _swoosh_op(x: Tensor, shift: float, offset: float) -> Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _SwooshFunction.apply(x, shift, offset)
    return _swoosh(x, shift, offset)


def swoosh_l(x: Tensor) -> Tensor:
    """SwooshL(z) = softplus(z - 4) - 0.08 z - 0.035 (logaddexp is the exact softplus)."""
    return _swoosh_op(x, 4.0, 0.035)


def swoosh_r(x: Tensor) -> Tensor:
    """SwooshR(z) = softplus(z - 1) - 0.08 z - 0.313261687."""
    return _swoosh_op(x, 1.0, 0.313261687)


class SwooshR(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swoosh_r(x)


def scaled_linear(in_features: int, out_features: int, bias: bool = True,
                  initial_scale: float = 1.0) -> nn.Linear:
    """The reference's "ScaledLinear": a plain nn.Linear whose default init is shrunk.

    Only the initialisation differs from nn.Linear (it matters when training from scratch, not
    when loading weights); the state dict holds ordinary `.weight`/`.bias`.
    """
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(initial_scale)
        if bias:
            linear.bias.uniform_(-0.1 * initial_scale, 0.1 * initial_scale)
    return linear


class ActivationDropoutAndLinear(nn.Module):
    """Swoosh activation, dropout shared over time, then a linear layer (fused in the reference).

    Its parameters are stored directly as `.weight` and `.bias`. The activation is evaluated in
    float32, as the reference's non-k2 path does.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str,
                 initial_scale: float = 1.0):
        super().__init__()
        ref = scaled_linear(in_channels, out_channels, initial_scale=initial_scale)
        self.weight = ref.weight
        self.bias = ref.bias
        self.activation = {"SwooshL": swoosh_l, "SwooshR": swoosh_r}[activation]

    def forward(self, x: Tensor, dropout_p: float = 0.0) -> Tensor:
        # (T, B, C). float32 island: the activation is computed in float32 and cast back.
        x = self.activation(x.float()).to(x.dtype)
        if self.training and dropout_p > 0.0:
            # One mask per (sequence, channel), shared over time (dim 0), as in the reference;
            # the 1/(1-p) rescaling is folded into the small mask: one full-size multiply.
            keep = (torch.rand_like(x[:1]) >= dropout_p).to(x.dtype) / (1.0 - dropout_p)
            x = x * keep
        return F.linear(x, self.weight, self.bias)


class BiasNorm(nn.Module):
    """x * exp(log_scale) / sqrt(mean_c((x - bias)^2)).

    The bias enters only the statistic, there is no epsilon and log_scale is a 0-dim scalar.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        scales = (x - self.bias).pow(2).mean(dim=-1, keepdim=True).pow(-0.5) * self.log_scale.exp()
        return x * scales


class BypassModule(nn.Module):
    """y = x0 + (x - x0) * s with a learned per-channel s (used for bypass, bypass_mid, out_combiner)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((num_channels,), 0.5))

    def forward(self, x0: Tensor, x: Tensor, skip_rate: float = 0.0) -> Tensor:
        scale = self.bypass_scale
        if self.training and skip_rate > 0.0:
            # Layer skipping: the scale is zeroed per sequence, so the layer returns its input.
            keep = (torch.rand(x.shape[1], 1, device=x.device) >= skip_rate).to(x.dtype)
            scale = scale * keep  # (B, C), broadcast over time
        return x0 + (x - x0) * scale


# --------------------------------------------------------------------------------------------
# Positional table and time embedding (float32 islands)
# --------------------------------------------------------------------------------------------


def compact_rel_pos_table(seq_len: int, pos_dim: int, device=None) -> Tensor:
    """The compact relative positional table, shape (1, 2T-1, pos_dim), offsets -(T-1)..(T-1).

    Computed in float32 like the reference; log-compressed offsets are squashed by atan so
    arbitrarily long inputs map into a bounded angle, and the last column is a constant 1 that
    acts as a bias for the position score.
    """
    d = torch.arange(-(seq_len - 1), seq_len, device=device, dtype=torch.float32).unsqueeze(1)
    c = pos_dim ** 0.5
    d_compressed = c * d.sign() * ((d.abs() + c).log() - math.log(c))
    length_scale = pos_dim / (2.0 * math.pi)  # length_factor 1
    angle = (d_compressed / length_scale).atan()
    freqs = torch.arange(1, pos_dim // 2 + 1, device=device, dtype=torch.float32)
    table = torch.zeros(2 * seq_len - 1, pos_dim, device=device, dtype=torch.float32)
    table[:, 0::2] = (angle * freqs).cos()
    table[:, 1::2] = (angle * freqs).sin()
    table[:, -1] = 1.0
    return table.unsqueeze(0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2)); t raw in [0, 1].

    Always float32 (the reference's float32 island); shape (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float().reshape(-1, 1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# --------------------------------------------------------------------------------------------
# Training-time regularisation (forward randomness only; all inactive in eval mode)
# --------------------------------------------------------------------------------------------


@dataclass
class Regularisation:
    """Rates of the training-time stochastic forward (section 4.6).

    Defaults are the values every ScheduledFloat has reached during dialog fine-tuning (the
    trainers offset the batch count by 100000, so the schedules sit at their final values).
    `layer_skip_rate` is multiplied by sqrt(downsampling factor) per stack. A single instance is
    shared by all layers of a model, so changing a field changes the whole model.
    """

    layer_skip_rate: float = 0.035
    attention_skip_rate: float = 0.0
    conv_skip_rate: float = 0.0
    ff2_skip_rate: float = 0.0
    ff3_skip_rate: float = 0.0
    const_attention_rate: float = 0.025
    pos_emb_skip_rate: float = 0.0
    ff_dropout: float = 0.1
    pos_dropout: float = 0.15

    @classmethod
    def off(cls) -> "Regularisation":
        """No forward randomness even in train mode (deterministic training steps)."""
        return cls(layer_skip_rate=0.0, const_attention_rate=0.0, ff_dropout=0.0, pos_dropout=0.0)


def sequence_dropout(x: Tensor, rate: float, training: bool) -> Tensor:
    """Zero a sub-module's output for whole sequences with probability `rate` (x is (T, B, C))."""
    if not training or rate <= 0.0:
        return x
    keep = (torch.rand(1, x.shape[1], 1, device=x.device) >= rate).to(x.dtype)
    return x * keep


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


class Attention:
    """The attention of one layer, computed once from the layer input and reused three times
    (NonlinAttention on head 0, self_attn1, self_attn2).

    Two exact-math paths:
      * explicit: the (H, B, T, T) weights A = softmax(q.k + p.R, padded keys set to -1000) are
        materialised once and multiplied with each value;
      * sdpa: q, k and the additive bias (position score + mask) are kept and every use calls
        `scaled_dot_product_attention(..., scale=1.0)`, which can use fused kernels.
    """

    def __init__(self, weights: Tensor | None = None, q: Tensor | None = None,
                 k: Tensor | None = None, bias: Tensor | None = None,
                 const_head0: Tensor | None = None):
        self.weights = weights  # (H, B, T, T), explicit path
        self.q, self.k, self.bias = q, k, bias  # (B, H, T, dq), (B, H, T, dq), (B, H, T, T)
        # Uniform weights over the unmasked keys for NonlinAttention (const_attention_rate).
        self.const_head0 = const_head0  # (1, B, T, T) or None

    def apply(self, v: Tensor, head0_only: bool = False) -> Tensor:
        """v: (H', B, T, dv) with H' = 1 for head0_only else H. Returns (H', B, T, dv)."""
        if head0_only and self.const_head0 is not None:
            return torch.matmul(self.const_head0.to(v.dtype), v)
        if self.weights is not None:
            w = self.weights[:1] if head0_only else self.weights
            return torch.matmul(w.to(v.dtype), v)
        q, k, bias = self.q, self.k, self.bias
        if head0_only:
            q, k, bias = q[:, :1], k[:, :1], bias[:, :1]
        out = F.scaled_dot_product_attention(
            q, k, v.transpose(0, 1), attn_mask=bias.to(q.dtype), scale=1.0
        )
        return out.transpose(0, 1)


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Attention weights with a relative-position score: q_i.k_j + p_i.R_h(j - i), no 1/sqrt(d)."""

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int,
                 pos_head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_head_dim = query_head_dim
        self.pos_head_dim = pos_head_dim
        in_proj_dim = (2 * query_head_dim + pos_head_dim) * num_heads
        self.in_proj = scaled_linear(embed_dim, in_proj_dim, initial_scale=query_head_dim ** -0.25)
        self.linear_pos = scaled_linear(pos_dim, num_heads * pos_head_dim, bias=False,
                                        initial_scale=0.05)

    def position_scores(self, p: Tensor, pos_emb: Tensor) -> Tensor:
        """p: (H, B, T, dp); pos_emb: (1, 2T-1, pos_dim) -> (H, B, T, T) with entry p_i.R(j-i)."""
        H, B, T, dp = p.shape
        r = self.linear_pos(pos_emb.to(p.dtype))  # (1, 2T-1, H*dp)
        r = r.reshape(2 * T - 1, H, dp).permute(1, 2, 0)  # (H, dp, 2T-1)
        scores = torch.matmul(p, r.unsqueeze(1))  # (H, B, T, 2T-1); column c is offset c-(T-1)
        # Row i needs columns (T-1-i)..(2T-2-i), i.e. offset j-i for keys j = 0..T-1: a strided
        # view whose rows start one column earlier each time.
        scores = scores.reshape(H * B, T, 2 * T - 1).contiguous()
        scores = scores.as_strided(
            (H * B, T, T), (T * (2 * T - 1), 2 * T - 2, 1),
            storage_offset=scores.storage_offset() + T - 1,
        )
        return scores.reshape(H, B, T, T)

    def forward(self, x: Tensor, pos_emb: Tensor, key_padding_mask: Tensor | None,
                use_sdpa: bool = False, reg: Regularisation | None = None) -> Attention:
        T, B, _ = x.shape
        H, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        proj = self.in_proj(x)
        # Split in order (q, k, p), each head-major.
        q = proj[..., : H * dq].reshape(T, B, H, dq).permute(2, 1, 0, 3)  # (H, B, T, dq)
        k = proj[..., H * dq: 2 * H * dq].reshape(T, B, H, dq).permute(2, 1, 0, 3)
        p = proj[..., 2 * H * dq:].reshape(T, B, H, dp).permute(2, 1, 0, 3)  # (H, B, T, dp)

        training = self.training and reg is not None
        use_pos = not (training and reg.pos_emb_skip_rate > 0
                       and float(torch.rand(())) < reg.pos_emb_skip_rate)
        pos_scores = self.position_scores(p, pos_emb) if use_pos else None
        mask = key_padding_mask[None, :, None, :] if key_padding_mask is not None else None

        const_head0 = None
        if training and reg.const_attention_rate > 0 \
                and float(torch.rand(())) < reg.const_attention_rate:
            # Uniform weights over the unmasked keys, for the whole batch.
            valid = torch.ones(1, B, T, T, dtype=q.dtype, device=q.device)
            if mask is not None:
                valid = valid.masked_fill(mask, 0.0)
            const_head0 = valid / valid.sum(dim=-1, keepdim=True)

        if use_sdpa:
            # The mask goes into the additive bias. Zeroing the padded keys makes a masked score
            # 0 + (-1000), exactly the reference's fill value, even for huge q.k.
            bias = pos_scores
            if mask is not None:
                if bias is None:
                    bias = torch.zeros(H, B, T, T, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(mask, -1000.0)
                k = k.masked_fill(key_padding_mask[None, :, :, None], 0.0)
            if bias is None:
                bias = torch.zeros(H, B, 1, T, dtype=q.dtype, device=q.device)
            return Attention(q=q.transpose(0, 1), k=k.transpose(0, 1),
                             bias=bias.transpose(0, 1), const_head0=const_head0)

        scores = torch.matmul(q, k.transpose(-2, -1))  # (H, B, T, T), no 1/sqrt(d)
        if pos_scores is not None:
            scores = scores + pos_scores
        if mask is not None:
            scores = scores.masked_fill(mask, -1000.0)
        return Attention(weights=scores.softmax(dim=-1), const_head0=const_head0)


class SelfAttention(nn.Module):
    """Per-head weighted sum of a value projection using precomputed attention weights."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim)
        self.out_proj = scaled_linear(num_heads * value_head_dim, embed_dim, initial_scale=0.05)

    def forward(self, x: Tensor, attn: Attention) -> Tensor:
        T, B, _ = x.shape
        v = self.in_proj(x).reshape(T, B, self.num_heads, -1).permute(2, 1, 0, 3)  # (H, B, T, dv)
        out = attn.apply(v)
        out = out.permute(2, 1, 0, 3).reshape(T, B, -1)  # heads concatenated, head-major
        return self.out_proj(out)


class NonlinAttention(nn.Module):
    """x * tanh(s) mixed over time with head 0's weights (all channels as one head), times y."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, 3 * hidden_channels)
        self.out_proj = scaled_linear(hidden_channels, channels, initial_scale=0.05)

    def forward(self, x: Tensor, attn: Attention) -> Tensor:
        s, x, y = self.in_proj(x).chunk(3, dim=-1)  # split order (s, x, y)
        x = x * torch.tanh(s)
        x = attn.apply(x.transpose(0, 1).unsqueeze(0), head0_only=True)  # (1, B, T, hidden)
        x = x.squeeze(0).transpose(0, 1) * y
        return self.out_proj(x)


# --------------------------------------------------------------------------------------------
# Feedforward and convolution
# --------------------------------------------------------------------------------------------


class FeedforwardModule(nn.Module):
    """Linear -> SwooshL -> dropout (shared over time) -> Linear."""

    def __init__(self, embed_dim: int, feedforward_dim: int, reg: Regularisation):
        super().__init__()
        self.reg = reg
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.out_proj = ActivationDropoutAndLinear(feedforward_dim, embed_dim, "SwooshL",
                                                   initial_scale=0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj(x), self.reg.ff_dropout)


class ConvolutionModule(nn.Module):
    """GLU-style gate, depthwise conv over time ('same' padding), SwooshR + Linear."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        assert kernel_size % 2 == 1, "kernel_size must be odd for 'same' padding"
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, groups=channels,
                                        padding=kernel_size // 2, bias=True)
        self.out_proj = ActivationDropoutAndLinear(channels, channels, "SwooshR",
                                                   initial_scale=0.05)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        x, gate = self.in_proj(x).chunk(2, dim=-1)  # split order (x, gate)
        x = x * torch.sigmoid(gate)
        if key_padding_mask is not None:
            # Padded frames must not leak into real frames through the kernel.
            x = x.masked_fill(key_padding_mask.t().unsqueeze(-1), 0.0)
        x = self.depthwise_conv(x.permute(1, 2, 0)).permute(2, 0, 1)  # (B, C, T) conv
        return self.out_proj(x)


# --------------------------------------------------------------------------------------------
# Layer, stack, down/upsampling
# --------------------------------------------------------------------------------------------


class Zipformer2EncoderLayer(nn.Module):
    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int,
                 pos_head_dim: int, value_head_dim: int, feedforward_dim: int,
                 cnn_module_kernel: int, reg: Regularisation, downsample: int = 1):
        super().__init__()
        self.reg = reg
        # Deeper-downsampled layers are skipped more often: rate * sqrt(ds).
        self.skip_rate_factor = math.sqrt(downsample)
        self.bypass = BypassModule(embed_dim)
        self.bypass_mid = BypassModule(embed_dim)
        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim, pos_dim, num_heads, query_head_dim, pos_head_dim)
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedforwardModule(embed_dim, feedforward_dim * 3 // 4, reg)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, reg)
        self.feed_forward3 = FeedforwardModule(embed_dim, feedforward_dim * 5 // 4, reg)
        self.nonlin_attention = NonlinAttention(embed_dim, embed_dim * 3 // 4)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel)
        self.norm = BiasNorm(embed_dim)

    def forward(self, x: Tensor, pos_emb: Tensor, time_emb: Tensor | None = None,
                key_padding_mask: Tensor | None = None, use_sdpa: bool = False) -> Tensor:
        """x: (T, B, C); time_emb: (B, C) or None; key_padding_mask: (B, T), True = padding."""
        reg, training = self.reg, self.training
        x0 = x
        # 1. Attention weights from the layer input, before any time embedding.
        attn = self.self_attn_weights(x0, pos_emb, key_padding_mask, use_sdpa, reg)
        # One per-sequence mask for the three attention users (sequence dropout).
        attn_keep = None
        if training and reg.attention_skip_rate > 0:
            attn_keep = (torch.rand(1, x.shape[1], 1, device=x.device)
                         >= reg.attention_skip_rate).to(x.dtype)

        def attn_out(y: Tensor) -> Tensor:
            return y if attn_keep is None else y * attn_keep

        temb = time_emb.unsqueeze(0) if time_emb is not None else None
        if temb is not None:  # 2.
            x = x + temb
        x = x + self.feed_forward1(x)  # 3.
        x = x + attn_out(self.nonlin_attention(x, attn))  # 4.
        x = x + attn_out(self.self_attn1(x, attn))  # 5.
        if temb is not None:  # 6.
            x = x + temb
        x = x + sequence_dropout(self.conv_module1(x, key_padding_mask), reg.conv_skip_rate, training)
        x = x + sequence_dropout(self.feed_forward2(x), reg.ff2_skip_rate, training)  # 7.
        x = self.bypass_mid(x0, x)  # 8.
        x = x + attn_out(self.self_attn2(x, attn))  # 9. reuses the weights of step 1
        if temb is not None:  # 10.
            x = x + temb
        x = x + sequence_dropout(self.conv_module2(x, key_padding_mask), reg.conv_skip_rate, training)
        x = x + sequence_dropout(self.feed_forward3(x), reg.ff3_skip_rate, training)  # 11.
        x = self.norm(x)  # 12.
        skip_rate = reg.layer_skip_rate * self.skip_rate_factor if training else 0.0
        return self.bypass(x0, x, skip_rate=skip_rate)  # 13.


class Zipformer2Encoder(nn.Module):
    """One stack: its own positional table, its own time projection, layers run in order."""

    def __init__(self, num_layers: int, pos_dim: int, time_embed_dim: int | None,
                 embed_dim: int, reg: Regularisation, **layer_kwargs):
        super().__init__()
        self.pos_dim = pos_dim
        self.reg = reg
        self.layers = nn.ModuleList(
            [Zipformer2EncoderLayer(embed_dim=embed_dim, pos_dim=pos_dim, reg=reg, **layer_kwargs)
             for _ in range(num_layers)]
        )
        if time_embed_dim is not None:
            self.time_emb = nn.Sequential(SwooshR(), nn.Linear(time_embed_dim, embed_dim))

    def forward(self, x: Tensor, time_emb: Tensor | None = None,
                key_padding_mask: Tensor | None = None, use_sdpa: bool = False) -> Tensor:
        pos_emb = compact_rel_pos_table(x.shape[0], self.pos_dim, x.device).to(x.dtype)
        if self.training and self.reg.pos_dropout > 0:
            pos_emb = F.dropout(pos_emb, self.reg.pos_dropout, training=True)
        if time_emb is not None:
            time_emb = self.time_emb(time_emb)
        for layer in self.layers:
            x = layer(x, pos_emb, time_emb, key_padding_mask, use_sdpa)
        return x


class SimpleDownsample(nn.Module):
    """Softmax-weighted average of groups of `ds` frames; the tail is padded with the last frame."""

    def __init__(self, downsample: int):
        super().__init__()
        self.downsample = downsample
        self.bias = nn.Parameter(torch.zeros(downsample))

    def forward(self, x: Tensor) -> Tensor:
        T, B, C = x.shape
        ds = self.downsample
        T_out = (T + ds - 1) // ds
        pad = T_out * ds - T
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, B, C)], dim=0)
        weights = self.bias.softmax(dim=0).to(x.dtype)
        return (x.reshape(T_out, ds, B, C) * weights.reshape(1, ds, 1, 1)).sum(dim=1)


def simple_upsample(x: Tensor, upsample: int, length: int) -> Tensor:
    """Repeat each frame `upsample` times, then cut to `length` frames."""
    return x.repeat_interleave(upsample, dim=0)[:length]


class DownsampledZipformer2Encoder(nn.Module):
    """A stack run at a lower frame rate; its output is merged with its input by `out_combiner`."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int):
        super().__init__()
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(downsample)
        self.encoder = encoder
        self.out_combiner = BypassModule(dim)

    def forward(self, x: Tensor, time_emb: Tensor | None = None,
                key_padding_mask: Tensor | None = None, use_sdpa: bool = False) -> Tensor:
        x_orig = x
        ds = self.downsample_factor
        x = self.downsample(x)
        if key_padding_mask is not None:
            # The first frame of each group decides whether the group is padding.
            key_padding_mask = key_padding_mask[:, ::ds]
        x = self.encoder(x, time_emb, key_padding_mask, use_sdpa)
        x = simple_upsample(x, ds, x_orig.shape[0])
        return self.out_combiner(x_orig, x)


# --------------------------------------------------------------------------------------------
# TTSZipformer
# --------------------------------------------------------------------------------------------


def _as_tuple(value, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values, got {list(value)}")
        return tuple(value)
    return (value,) * n


class TTSZipformer(nn.Module):
    """in_proj -> stacks run strictly one after another -> out_proj.

    There are no U-Net skips between stacks: each downsampled stack merges its own input and
    output. The decoder variant (time_embed_dim set) owns `time_embed` (Linear, SwooshR, Linear)
    and a per-stack `time_emb` projection added three times inside every layer.
    """

    def __init__(self, in_dim: int, out_dim: int, downsampling_factor=(1,), num_encoder_layers=4,
                 cnn_module_kernel=9, encoder_dim: int = 192, feedforward_dim: int = 512,
                 num_heads: int = 4, query_head_dim: int = 32, pos_head_dim: int = 4,
                 value_head_dim: int = 12, pos_dim: int = 48, time_embed_dim: int | None = None,
                 reg: Regularisation | None = None, use_sdpa: bool = False,
                 guidance_scale_embed: bool = False):
        super().__init__()
        downsampling_factor = tuple(downsampling_factor)
        n = len(downsampling_factor)
        num_encoder_layers = _as_tuple(num_encoder_layers, n)
        cnn_module_kernel = _as_tuple(cnn_module_kernel, n)
        self.reg = reg if reg is not None else Regularisation()
        self.use_sdpa = use_sdpa
        self.in_dim, self.out_dim = in_dim, out_dim
        self.time_embed_dim = time_embed_dim
        self.downsampling_factor = downsampling_factor

        self.in_proj = nn.Linear(in_dim, encoder_dim)
        encoders = []
        for i, ds in enumerate(downsampling_factor):
            stack = Zipformer2Encoder(
                num_layers=num_encoder_layers[i], pos_dim=pos_dim, time_embed_dim=time_embed_dim,
                embed_dim=encoder_dim, reg=self.reg, num_heads=num_heads,
                query_head_dim=query_head_dim, pos_head_dim=pos_head_dim,
                value_head_dim=value_head_dim, feedforward_dim=feedforward_dim,
                cnn_module_kernel=cnn_module_kernel[i], downsample=ds,
            )
            if ds != 1:
                stack = DownsampledZipformer2Encoder(stack, encoder_dim, ds)
            encoders.append(stack)
        self.encoders = nn.ModuleList(encoders)
        if time_embed_dim is not None:
            self.time_embed = nn.Sequential(
                nn.Linear(time_embed_dim, time_embed_dim * 2), SwooshR(),
                nn.Linear(time_embed_dim * 2, time_embed_dim),
            )
        if guidance_scale_embed:
            # Distill variants: the guidance scale is an input, embedded like t and added to the
            # time sinusoid before `time_embed` (fact sheet 3.4).
            if time_embed_dim is None:
                raise ValueError("a guidance-scale embedding needs a time embedding")
            self.guidance_scale_embed = scaled_linear(time_embed_dim, time_embed_dim, bias=False,
                                                      initial_scale=0.1)
        self.out_proj = nn.Linear(encoder_dim, out_dim)

    @property
    def has_guidance_scale_embed(self) -> bool:
        return hasattr(self, "guidance_scale_embed")

    def embed_time(self, t: Tensor, batch_size: int, dtype: torch.dtype,
                   guidance_scale: Tensor | float | None = None) -> Tensor:
        """t (and w): scalar, (B,) or (B, 1, 1) -> (B, time_embed_dim) after `time_embed`."""
        def per_utterance(v) -> Tensor:
            v = torch.as_tensor(v).reshape(-1)
            return v.expand(batch_size) if v.numel() == 1 else v

        emb = timestep_embedding(per_utterance(t), self.time_embed_dim)
        if self.has_guidance_scale_embed:
            if guidance_scale is None:
                raise ValueError("this decoder is a distilled one: pass the guidance scale")
            w = per_utterance(guidance_scale).to(emb.device)
            emb = emb + self.guidance_scale_embed(
                timestep_embedding(w, self.time_embed_dim).to(self.guidance_scale_embed.weight.dtype)
            ).float()
        elif guidance_scale is not None:
            raise ValueError("this decoder has no guidance-scale embedding (use CFG instead)")
        return self.time_embed(emb.to(dtype))

    def run_stacks(self, x: Tensor, t: Tensor | None, padding_mask: Tensor | None,
                   guidance_scale: Tensor | float | None = None) -> Tensor:
        """x: (B, T, C) after in_proj -> (B, T, C) before out_proj."""
        time_emb = None
        if self.time_embed_dim is not None:
            if t is None:
                raise ValueError("this TTSZipformer has a time embedding: pass t")
            time_emb = self.embed_time(t.to(x.device) if torch.is_tensor(t) else t,
                                       x.shape[0], x.dtype, guidance_scale)
        x = x.transpose(0, 1)  # (T, B, C)
        for stack in self.encoders:
            x = stack(x, time_emb, padding_mask, self.use_sdpa)
        return x.transpose(0, 1)

    def forward(self, x: Tensor, t: Tensor | None = None, padding_mask: Tensor | None = None,
                guidance_scale: Tensor | float | None = None) -> Tensor:
        """x: (B, T, in_dim); t: scalar/(B,) time (decoder only); padding_mask: (B, T) True = pad;
        guidance_scale: scalar/(B,), only for a decoder with a guidance-scale embedding."""
        return self.out_proj(self.run_stacks(self.in_proj(x), t, padding_mask, guidance_scale))


class TTSZipformerTwoStream(TTSZipformer):
    """One shared backbone with two input and two output heads (ZipVoice-Dialog-Stereo).

    Head 0 is the stereo head (in_dim[0] = 5F wide input, 2F output), head 1 the mono head
    (3F -> F). The head is chosen from the width of the input.
    """

    def __init__(self, in_dim: tuple[int, int], out_dim: tuple[int, int], encoder_dim: int = 512,
                 **kwargs):
        super().__init__(in_dim=in_dim[1], out_dim=out_dim[1], encoder_dim=encoder_dim, **kwargs)
        self.in_dims, self.out_dims = tuple(in_dim), tuple(out_dim)
        self.in_proj = nn.ModuleList([nn.Linear(d, encoder_dim) for d in in_dim])
        self.out_proj = nn.ModuleList([nn.Linear(encoder_dim, d) for d in out_dim])

    def forward(self, x: Tensor, t: Tensor | None = None, padding_mask: Tensor | None = None,
                guidance_scale: Tensor | float | None = None) -> Tensor:
        head = 0 if x.shape[-1] == self.in_dims[0] else 1
        if x.shape[-1] != self.in_dims[head]:
            raise ValueError(f"input width {x.shape[-1]} matches no head {self.in_dims}")
        return self.out_proj[head](self.run_stacks(self.in_proj[head](x), t, padding_mask,
                                                   guidance_scale))
