"""ZipVoice, ZipVoice-Dialog and ZipVoice-Dialog-Stereo: the models and their training losses.

Facts from `../shared/docs/zipvoice-reference.md` sections 3 and 5 and the ZipVoice-Dialog paper
(sections 3-4, appendix A.1).

Conventions
  * Flow matching: t = 1 is data, x_t = t x1 + (1 - t) x0, the decoder predicts x1 - x0.
  * Every feature given to these models is the Vocos log-mel already multiplied by
    `FEAT_SCALE` = 0.1 (the trainer scales; the models never rescale).
  * Token sequences are lists of ids; each row is padded with pad_id to the batch maximum plus
    one extra pad, the "pad slot" that receives the remainder frames of average upsampling.
  * Masks are boolean with True = "padding" (padding masks) or True = "to be generated"
    (speech-condition masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.zipformer import Regularisation, TTSZipformer, TTSZipformerTwoStream


@dataclass(frozen=True)
class ZipVoiceConfig:
    """The 18 architecture hyper-parameters (model.json -> "model"), the reference's base values.

    The per-stack lists of the decoder are tuples here (hashable, immutable) and lists in JSON.
    """

    fm_decoder_downsampling_factor: tuple[int, ...] = (1, 2, 4, 2, 1)
    fm_decoder_num_layers: tuple[int, ...] = (2, 2, 4, 4, 4)
    fm_decoder_cnn_module_kernel: tuple[int, ...] = (31, 15, 7, 15, 31)
    fm_decoder_feedforward_dim: int = 1536
    fm_decoder_num_heads: int = 4
    fm_decoder_dim: int = 512
    text_encoder_num_layers: int = 4
    text_encoder_feedforward_dim: int = 512
    text_encoder_cnn_module_kernel: int = 9
    text_encoder_num_heads: int = 4
    text_encoder_dim: int = 192
    time_embed_dim: int = 192
    text_embed_dim: int = 192
    query_head_dim: int = 32
    value_head_dim: int = 12
    pos_head_dim: int = 4
    pos_dim: int = 48
    feat_dim: int = 100

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict, where: str = "model config") -> "ZipVoiceConfig":
        """Validate a "model" section: exactly the 18 keys, each a positive integer or (decoder
        stacks) a list of them as long as ``fm_decoder_downsampling_factor``. Errors name `where`
        (the file) and the key, not a layer that failed to build."""
        keys = cls.keys()
        missing = [k for k in keys if k not in values]
        unknown = [k for k in values if k not in keys]
        if missing or unknown:
            raise ValueError(f"{where}: 'model' section: missing keys {missing}, unknown keys {unknown}")

        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        stacks = values["fm_decoder_downsampling_factor"]
        if not (isinstance(stacks, (list, tuple)) and stacks and all(positive_int(v) for v in stacks)):
            raise ValueError(f"{where}: model.fm_decoder_downsampling_factor must be a non-empty list "
                             f"of positive integers, got {stacks!r}")
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                if len(value) != len(stacks) or not all(positive_int(v) for v in value):
                    raise ValueError(f"{where}: model.{key} must be {len(stacks)} positive integers (one "
                                     f"per fm_decoder_downsampling_factor stack), got {value!r}")
            elif key in ("fm_decoder_num_layers", "fm_decoder_cnn_module_kernel"):
                raise ValueError(f"{where}: model.{key} must be a list of {len(stacks)} positive "
                                 f"integers, got {value!r}")
            elif not positive_int(value):
                raise ValueError(f"{where}: model.{key} must be a positive integer, got {value!r}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})

    def to_dict(self) -> dict:
        """The JSON form, keys in the reference's order, lists for the per-stack values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# The JSON form of the base config and its key order (both derived from ZipVoiceConfig).
BASE_MODEL_CONFIG: dict = ZipVoiceConfig().to_dict()
MODEL_CONFIG_KEYS: tuple[str, ...] = ZipVoiceConfig.keys()


# --------------------------------------------------------------------------------------------
# Small testable pieces
# --------------------------------------------------------------------------------------------


def pad_tokens(tokens: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Pad to max_len + 1: the always-present trailing pad is the slot for remainder frames.

    Returns (padded (B, max_len + 1) long, lengths (B,) long).
    """
    if len(tokens) == 0:
        raise ValueError("empty batch of token sequences")
    lens = torch.tensor([len(seq) for seq in tokens], dtype=torch.long)
    padded = torch.full((len(tokens), int(lens.max()) + 1), pad_id, dtype=torch.long)
    for i, seq in enumerate(tokens):
        padded[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return padded.to(device), lens.to(device)  # built on the CPU: one copy per tensor


def lengths_to_padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """(B,) lengths -> (B, T) bool, True at positions >= length."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def average_upsample_indices(tokens_lens: Tensor, features_lens: Tensor, num_frames: int) -> Tensor:
    """Which token each frame reads in average upsampling, shape (B, num_frames).

    Each of the N tokens gets floor(L/N) consecutive frames; the L - N*floor(L/N) remainder frames
    and all batch-padding frames point to index N, the trailing pad slot.
    """
    frames = torch.arange(num_frames, device=tokens_lens.device).unsqueeze(0)
    n = tokens_lens.unsqueeze(1)
    per_token = torch.div(features_lens.unsqueeze(1), n.clamp(min=1), rounding_mode="floor")
    idx = torch.div(frames, per_token.clamp(min=1), rounding_mode="floor")
    return torch.where(frames < n * per_token, idx, n)


def average_upsample(text_out: Tensor, tokens_lens: Tensor, features_lens: Tensor,
                     num_frames: int) -> Tensor:
    """Gather token vectors (B, S+1, F) into a frame-level condition (B, num_frames, F)."""
    idx = average_upsample_indices(tokens_lens, features_lens, num_frames)
    return torch.gather(text_out, 1, idx.unsqueeze(-1).expand(-1, -1, text_out.shape[-1]))


def speaker_turn_rows(tokens_padded: Tensor, spk_a_id: int, spk_b_id: int) -> Tensor:
    """Row of `spk_embed` per token by the parity rule of the reference (section 3.2).

    The running count of turn markers ([S1] or [S2], either one, current token included) is odd
    -> row 1 (the first turn, from its [S1] on), even -> row 0 (second, fourth, ... turns and any
    token before the first marker). The names of the two ids do not matter; only parity does.
    """
    is_marker = (tokens_padded == spk_a_id) | (tokens_padded == spk_b_id)
    return torch.cumsum(is_marker.long(), dim=1) % 2


def speech_condition_span_mask(features_lens: Tensor, starts: Tensor, sizes: Tensor,
                               max_len: int) -> Tensor:
    """(B, T) bool, True on frames [start, start + size) of each utterance."""
    frames = torch.arange(max_len, device=features_lens.device).unsqueeze(0)
    return (frames >= starts.unsqueeze(1)) & (frames < (starts + sizes).unsqueeze(1))


def condition_time_mask(features_lens: Tensor, mask_percent=(0.7, 1.0), max_len: int | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """ZipVoice: a random contiguous span of floor(r L) frames, r ~ U(mask_percent).

    The unmasked frames on either side are the acoustic prompt. True = to be generated.
    """
    max_len = int(features_lens.max()) if max_len is None else max_len
    lo, hi = mask_percent
    B, dev = features_lens.shape[0], features_lens.device
    r = torch.rand(B, generator=generator, device=dev) * (hi - lo) + lo
    sizes = (r * features_lens).floor().long()
    starts = (torch.rand(B, generator=generator, device=dev) * (features_lens - sizes)).floor().long()
    return speech_condition_span_mask(features_lens, starts, sizes, max_len)


def condition_time_mask_suffix(features_lens: Tensor, mask_percent=(0.5, 1.0),
                               max_len: int | None = None,
                               generator: torch.Generator | None = None) -> Tensor:
    """Dialog/Stereo: the last floor(r L) frames, r ~ U(mask_percent); the prompt is a prefix.

    Batch-padding frames are never in the mask (they are excluded from the loss anyway).
    """
    max_len = int(features_lens.max()) if max_len is None else max_len
    lo, hi = mask_percent
    r = torch.rand(features_lens.shape[0], generator=generator, device=features_lens.device)
    sizes = ((r * (hi - lo) + lo) * features_lens).floor().long()
    return speech_condition_span_mask(features_lens, features_lens - sizes, sizes, max_len)


def flow_matching_loss(pred: Tensor, target: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean of (v - u)^2 over every feature of the frames in loss_mask (B, T); float32."""
    sq = (pred.float() - target.float()).pow(2)
    m = loss_mask.unsqueeze(-1).to(sq.dtype)
    return (sq * m).sum() / (m.sum() * sq.shape[-1]).clamp(min=1.0)


def speaker_exclusive_loss(x1_hat: Tensor, x1: Tensor, loss_mask: Tensor,
                           feat_dim: int = 100) -> Tensor:
    """Penalty on frames where both channels of the one-step estimate are louder than a threshold.

    x1_hat, x1: (B, T, 2F) = [ch0 | ch1]. Frame energy = mean over the F bins of a channel. The
    threshold is per utterance: the median (torch.quantile q=0.5, i.e. the interpolated median of
    the paper's Quantile) of the ground-truth energies of both channels over all 2T frames,
    padding included as in the reference. Penalty = [e0 > th and e1 > th] (e0 - th)(e1 - th),
    averaged over the loss-mask frames.
    """
    x1_hat, x1 = x1_hat.float(), x1.float()
    e0, e1 = x1_hat[..., :feat_dim].mean(-1), x1_hat[..., feat_dim:].mean(-1)  # (B, T)
    gt = torch.cat([x1[..., :feat_dim].mean(-1), x1[..., feat_dim:].mean(-1)], dim=1)  # (B, 2T)
    th = torch.quantile(gt, 0.5, dim=1, keepdim=True)
    both = (e0 > th) & (e1 > th)
    penalty = both.to(e0.dtype) * (e0 - th) * (e1 - th)
    m = loss_mask.to(penalty.dtype)
    return (penalty * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ZipVoice(nn.Module):
    """Text embedding -> text encoder (100-dim) -> average upsampling -> flow-matching decoder."""

    speech_mask_percent = (0.7, 1.0)
    # Distilled variants take the guidance scale as a decoder input instead of running CFG.
    distilled = False

    def __init__(self, config: ZipVoiceConfig | None = None, *, vocab_size: int = 26,
                 pad_id: int = 0, regularisation: Regularisation | None = None, **hparams):
        """`config`, or the base config with `hparams` (ZipVoiceConfig field names) replaced."""
        super().__init__()
        if config is None:
            config = ZipVoiceConfig.from_dict({**BASE_MODEL_CONFIG, **hparams}, type(self).__name__)
        elif hparams:
            raise TypeError(f"give either a ZipVoiceConfig or hyper-parameters, not both: {sorted(hparams)}")
        c = self.config = config
        self.feat_dim = c.feat_dim
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.reg = regularisation if regularisation is not None else Regularisation()
        heads = dict(query_head_dim=c.query_head_dim, pos_head_dim=c.pos_head_dim,
                     value_head_dim=c.value_head_dim, pos_dim=c.pos_dim, reg=self.reg)

        self.embed = nn.Embedding(vocab_size, c.text_embed_dim)
        self.text_encoder = TTSZipformer(
            in_dim=c.text_embed_dim, out_dim=c.feat_dim, downsampling_factor=(1,),
            num_encoder_layers=c.text_encoder_num_layers,
            cnn_module_kernel=c.text_encoder_cnn_module_kernel, encoder_dim=c.text_encoder_dim,
            feedforward_dim=c.text_encoder_feedforward_dim, num_heads=c.text_encoder_num_heads,
            time_embed_dim=None, **heads,
        )
        self.fm_decoder = self._make_fm_decoder(
            downsampling_factor=c.fm_decoder_downsampling_factor,
            num_encoder_layers=c.fm_decoder_num_layers,
            cnn_module_kernel=c.fm_decoder_cnn_module_kernel, encoder_dim=c.fm_decoder_dim,
            feedforward_dim=c.fm_decoder_feedforward_dim, num_heads=c.fm_decoder_num_heads,
            time_embed_dim=c.time_embed_dim, guidance_scale_embed=self.distilled, **heads,
        )

    def _make_fm_decoder(self, **kwargs) -> TTSZipformer:
        return TTSZipformer(in_dim=3 * self.feat_dim, out_dim=self.feat_dim, **kwargs)

    # ---- attention kernel choice -----------------------------------------------------------

    def set_attention_backend(self, backend: str) -> None:
        """Attention kernel: "explicit" (materialised weights) or "sdpa" (fused kernels)."""
        if backend not in ("explicit", "sdpa"):
            raise ValueError(f"unknown attention backend {backend!r}: use 'explicit' or 'sdpa'")
        self.text_encoder.use_sdpa = self.fm_decoder.use_sdpa = backend == "sdpa"

    # ---- text path -------------------------------------------------------------------------

    def forward_text_embed(self, tokens: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Token id lists -> (encoder outputs (B, S+1, F) incl. turn embeddings, lengths (B,))."""
        device = self.embed.weight.device
        tokens_padded, tokens_lens = pad_tokens(tokens, self.pad_id, device)
        if int(tokens_padded.max()) >= self.vocab_size or int(tokens_padded.min()) < 0:
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        # The trailing pad is masked as a key but still receives an output vector.
        key_mask = lengths_to_padding_mask(tokens_lens, tokens_padded.shape[1])
        text_out = self.text_encoder(self.embed(tokens_padded), padding_mask=key_mask)
        return self.add_speaker_turns(text_out, tokens_padded), tokens_lens

    def add_speaker_turns(self, text_out: Tensor, tokens_padded: Tensor) -> Tensor:
        return text_out  # the monologue model has no turn embedding

    def forward_text_condition(self, tokens: list[list[int]], features_lens: Tensor,
                               num_frames: int | None = None) -> Tensor:
        """Frame-level text condition (B, T, F) by average upsampling over features_lens frames."""
        num_frames = int(features_lens.max()) if num_frames is None else num_frames
        text_out, tokens_lens = self.forward_text_embed(tokens)
        return average_upsample(text_out, tokens_lens, features_lens.to(text_out.device), num_frames)

    # ---- decoder ---------------------------------------------------------------------------

    def forward_fm_decoder(self, t: Tensor | float, xt: Tensor, text_condition: Tensor,
                           speech_condition: Tensor, padding_mask: Tensor | None,
                           guidance_scale: Tensor | float | None = None) -> Tensor:
        """Velocity from the input [x_t, text_condition, speech_condition] (feature axis).

        guidance_scale (scalar or (B,)) only for distilled models, which embed it."""
        x = torch.cat([xt, text_condition.to(xt.dtype), speech_condition.to(xt.dtype)], dim=-1)
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.float32, device=xt.device)
        return self.fm_decoder(x, t, padding_mask, guidance_scale)

    # ---- training --------------------------------------------------------------------------

    def speech_condition_mask(self, features_lens: Tensor, num_frames: int,
                              generator: torch.Generator | None = None) -> Tensor:
        return condition_time_mask(features_lens, self.speech_mask_percent, num_frames, generator)

    def training_features(self, features: Tensor, batch_idx: int) -> Tensor:
        """The part of a stored training batch that update `batch_idx` (from 0) trains on."""
        return features

    def validation_features(self, features: Tensor) -> Tensor:
        return features

    def forward(self, tokens: list[list[int]], features: Tensor, features_lens: Tensor, *,
                condition_drop_ratio: float = 0.2, t: Tensor | None = None,
                noise: Tensor | None = None, speech_mask: Tensor | None = None) -> dict:
        """Flow-matching training loss.

        tokens: B lists of token ids; features: (B, T, F) log-mels *already multiplied by 0.1*;
        features_lens: (B,) valid frames. Optional t (B,), noise (B, T, F) and speech_mask
        (B, T, True = to generate) make a step deterministic (validation uses t_b = b/B).
        Returns {"loss", "fm_loss", "num_frames"} ("loss" is what to backpropagate).
        """
        out = self._flow_matching_step(tokens, features, features_lens, condition_drop_ratio,
                                       t, noise, speech_mask)
        return {"loss": out["fm_loss"], "fm_loss": out["fm_loss"], "num_frames": out["num_frames"]}

    def _flow_matching_step(self, tokens, features, features_lens, condition_drop_ratio, t, noise,
                            speech_mask) -> dict:
        B, T, _ = features.shape
        if len(tokens) != B:
            raise ValueError(f"{len(tokens)} token sequences for a batch of {B} feature sequences")
        features_lens = features_lens.to(features.device)
        padding_mask = lengths_to_padding_mask(features_lens, T)
        text_condition = self.forward_text_condition(tokens, features_lens, T)
        if speech_mask is None:
            speech_mask = self.speech_condition_mask(features_lens, T)
        x1 = features
        speech_condition = x1.masked_fill(speech_mask.unsqueeze(-1), 0.0)
        if condition_drop_ratio > 0:
            # CFG: the upsampled text condition is dropped per utterance.
            drop = torch.rand(B, 1, 1, device=x1.device) < condition_drop_ratio
            text_condition = text_condition.masked_fill(drop, 0.0)
        t = torch.rand(B, device=x1.device) if t is None else t.to(x1.device).reshape(B)
        x0 = torch.randn_like(x1) if noise is None else noise
        tt = t.reshape(B, 1, 1).to(x1.dtype)
        xt = tt * x1 + (1.0 - tt) * x0
        v = self.forward_fm_decoder(t, xt, text_condition, speech_condition, padding_mask)
        loss_mask = speech_mask & ~padding_mask
        return {"fm_loss": flow_matching_loss(v, x1 - x0, loss_mask), "num_frames": loss_mask.sum(),
                "v": v, "xt": xt, "t": tt, "x1": x1, "loss_mask": loss_mask}


class ZipVoiceDialog(ZipVoice):
    """ZipVoice plus speaker-turn embeddings added to the text-encoder output; suffix prompts."""

    speech_mask_percent = (0.5, 1.0)

    def __init__(self, *args, spk_a_id: int = 360, spk_b_id: int = 361, **kwargs):
        super().__init__(*args, **kwargs)
        self.spk_a_id, self.spk_b_id = spk_a_id, spk_b_id
        self.spk_embed = nn.Embedding(2, self.feat_dim)
        nn.init.normal_(self.spk_embed.weight, mean=0.0, std=0.1)

    def add_speaker_turns(self, text_out: Tensor, tokens_padded: Tensor) -> Tensor:
        rows = speaker_turn_rows(tokens_padded, self.spk_a_id, self.spk_b_id)
        not_pad = (tokens_padded != self.pad_id).unsqueeze(-1).to(text_out.dtype)
        return text_out + self.spk_embed(rows).to(text_out.dtype) * not_pad

    def speech_condition_mask(self, features_lens: Tensor, num_frames: int,
                              generator: torch.Generator | None = None) -> Tensor:
        return condition_time_mask_suffix(features_lens, self.speech_mask_percent, num_frames,
                                          generator)


class ZipVoiceDialogStereo(ZipVoiceDialog):
    """The dialog model with a two-head decoder: head 0 stereo (5F -> 2F), head 1 mono (3F -> F).

    Stereo features are [ch0 | ch1] (2F wide) for x_t, the speech condition and the velocity; the
    text condition stays F wide and is shared by both channels.
    """

    def _make_fm_decoder(self, **kwargs) -> TTSZipformer:
        F_ = self.feat_dim
        return TTSZipformerTwoStream(in_dim=(5 * F_, 3 * F_), out_dim=(2 * F_, F_), **kwargs)

    def training_features(self, features: Tensor, batch_idx: int) -> Tensor:
        """Even updates train the mono head on the downmix, odd ones the stereo head.

        `batch_idx` counts updates from 0 over the whole run, so the alternation is strict across
        epoch boundaries (the reference counts within the epoch: the same unless an epoch has an
        odd number of batches, which then gives two mono steps in a row)."""
        return split_stereo_training_features(features, batch_idx, self.feat_dim)

    def validation_features(self, features: Tensor) -> Tensor:
        """Validation scores the stereo path: [ch0 | ch1] of the [ch0 | ch1 | mix] layout."""
        return features[..., : 2 * self.feat_dim]

    def forward(self, tokens: list[list[int]], features: Tensor, features_lens: Tensor, *,
                condition_drop_ratio: float = 0.2, t: Tensor | None = None,
                noise: Tensor | None = None, speech_mask: Tensor | None = None,
                se_loss_weight: float = 1.0) -> dict:
        """features (×0.1): (B, T, F) for a mono step (head 1, plain flow matching) or (B, T, 2F)
        = [ch0 | ch1] for a stereo step (head 0, flow matching + speaker-exclusive loss).

        Training alternates mono and stereo batches; `split_stereo_training_features` cuts the
        stored [ch0 | ch1 | mix] layout. Returns {"loss", "fm_loss", "se_loss", "num_frames"}.
        """
        width = features.shape[-1]
        if width not in (self.feat_dim, 2 * self.feat_dim):
            raise ValueError(f"stereo model expects features of width {self.feat_dim} (mono) or "
                             f"{2 * self.feat_dim} (stereo), got {width}")
        out = self._flow_matching_step(tokens, features, features_lens, condition_drop_ratio,
                                       t, noise, speech_mask)
        fm = out["fm_loss"]
        if width == self.feat_dim:
            se = fm.new_zeros(())
        else:
            x1_hat = out["xt"] + out["v"] * (1.0 - out["t"])  # one Euler step to t = 1
            se = speaker_exclusive_loss(x1_hat, out["x1"], out["loss_mask"], self.feat_dim)
        return {"loss": fm + se_loss_weight * se, "fm_loss": fm, "se_loss": se,
                "num_frames": out["num_frames"]}


def split_stereo_training_features(features: Tensor, batch_idx: int,
                                   feat_dim: int = 100) -> Tensor:
    """Stereo training cuts carry [ch0 | ch1 | mix] (3F). Even batches train the mono head on the
    mix (last F dims), odd batches the stereo head on [ch0 | ch1] (first 2F dims)."""
    if features.shape[-1] != 3 * feat_dim:
        raise ValueError(f"stereo training features must be {3 * feat_dim} wide "
                         f"([ch0 | ch1 | mix]), got {features.shape[-1]}")
    return features[..., 2 * feat_dim:] if batch_idx % 2 == 0 else features[..., : 2 * feat_dim]


class ZipVoiceDistill(ZipVoice):
    """ZipVoice-Distill (the reference's few-step monologue model): loads its official weights."""

    distilled = True


class ZipVoiceDialogDistill(ZipVoiceDialog):
    """ZipVoice-Dialog-Distill: the dialog model with `fm_decoder.guidance_scale_embed` (192x192,
    no bias); sampled in 4-8 Euler steps without the CFG double pass."""

    distilled = True


class ZipVoiceDialogStereoDistill(ZipVoiceDialogStereo):
    """ZipVoice-Dialog-Stereo with the guidance-scale embedding (shared by both heads)."""

    distilled = True


MODEL_CLASSES = {
    "zipvoice": ZipVoice,
    "zipvoice_dialog": ZipVoiceDialog,
    "zipvoice_dialog_stereo": ZipVoiceDialogStereo,
    "zipvoice_distill": ZipVoiceDistill,
    "zipvoice_dialog_distill": ZipVoiceDialogDistill,
    "zipvoice_dialog_stereo_distill": ZipVoiceDialogStereoDistill,
}
DISTILL_SUFFIX = "_distill"


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
