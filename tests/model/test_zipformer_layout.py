"""State-dict layout of the base-size models against the rules of the reference fact sheet (4.1).

The expected key -> shape table is derived here from the documented rules (43 keys per layer,
wrapped vs unwrapped stacks, time embeddings, projections, embeddings), never from our own
model's state dict, so a naming or shape slip in model/ makes these tests fail.
"""

import json
from pathlib import Path

import pytest
import torch

from model.zipvoice import BASE_MODEL_CONFIG, ZipVoice, ZipVoiceDialog, ZipVoiceDialogStereo

REPO = Path(__file__).resolve().parents[2]
V_ZIPVOICE, V_DIALOG = 360, 388


def layer_shapes(C, ff, K, heads=4, dq=32, dv=12, dp=4, pos_dim=48):
    """The 43 keys of one Zipformer layer and their shapes (fact sheet 4.1 dimension rules)."""
    hidden_na = 3 * C // 4
    attn_in = heads * (2 * dq + dp)
    s = {
        "bypass.bypass_scale": (C,),
        "bypass_mid.bypass_scale": (C,),
        "self_attn_weights.in_proj.weight": (attn_in, C),
        "self_attn_weights.in_proj.bias": (attn_in,),
        "self_attn_weights.linear_pos.weight": (heads * dp, pos_dim),
        "nonlin_attention.in_proj.weight": (3 * hidden_na, C),
        "nonlin_attention.in_proj.bias": (3 * hidden_na,),
        "nonlin_attention.out_proj.weight": (C, hidden_na),
        "nonlin_attention.out_proj.bias": (C,),
        "norm.log_scale": (),
        "norm.bias": (C,),
    }
    for n in (1, 2):
        s[f"self_attn{n}.in_proj.weight"] = (heads * dv, C)
        s[f"self_attn{n}.in_proj.bias"] = (heads * dv,)
        s[f"self_attn{n}.out_proj.weight"] = (C, heads * dv)
        s[f"self_attn{n}.out_proj.bias"] = (C,)
        s[f"conv_module{n}.in_proj.weight"] = (2 * C, C)
        s[f"conv_module{n}.in_proj.bias"] = (2 * C,)
        s[f"conv_module{n}.depthwise_conv.weight"] = (C, 1, K)
        s[f"conv_module{n}.depthwise_conv.bias"] = (C,)
        s[f"conv_module{n}.out_proj.weight"] = (C, C)
        s[f"conv_module{n}.out_proj.bias"] = (C,)
    for n, hidden in ((1, ff * 3 // 4), (2, ff), (3, ff * 5 // 4)):
        s[f"feed_forward{n}.in_proj.weight"] = (hidden, C)
        s[f"feed_forward{n}.in_proj.bias"] = (hidden,)
        s[f"feed_forward{n}.out_proj.weight"] = (C, hidden)
        s[f"feed_forward{n}.out_proj.bias"] = (C,)
    assert len(s) == 43
    return s


def zipformer_shapes(prefix, in_dim, out_dim, C, ff, downsampling, layers, kernels,
                     time_embed_dim=None, stereo=False):
    s = {}
    if stereo:  # two heads: 0 = stereo, 1 = mono
        for i, (din, dout) in enumerate(zip(in_dim, out_dim)):
            s[f"{prefix}.in_proj.{i}.weight"] = (C, din)
            s[f"{prefix}.in_proj.{i}.bias"] = (C,)
            s[f"{prefix}.out_proj.{i}.weight"] = (dout, C)
            s[f"{prefix}.out_proj.{i}.bias"] = (dout,)
    else:
        s[f"{prefix}.in_proj.weight"] = (C, in_dim)
        s[f"{prefix}.in_proj.bias"] = (C,)
        s[f"{prefix}.out_proj.weight"] = (out_dim, C)
        s[f"{prefix}.out_proj.bias"] = (out_dim,)
    if time_embed_dim is not None:
        te = time_embed_dim
        s[f"{prefix}.time_embed.0.weight"] = (2 * te, te)
        s[f"{prefix}.time_embed.0.bias"] = (2 * te,)
        s[f"{prefix}.time_embed.2.weight"] = (te, 2 * te)
        s[f"{prefix}.time_embed.2.bias"] = (te,)
    for i, (ds, n_layers, K) in enumerate(zip(downsampling, layers, kernels)):
        stack = f"{prefix}.encoders.{i}"
        if ds != 1:  # wrapped stack
            s[f"{stack}.downsample.bias"] = (ds,)
            s[f"{stack}.out_combiner.bypass_scale"] = (C,)
            stack = f"{stack}.encoder"
        if time_embed_dim is not None:
            s[f"{stack}.time_emb.1.weight"] = (C, time_embed_dim)
            s[f"{stack}.time_emb.1.bias"] = (C,)
        for n in range(n_layers):
            for k, shape in layer_shapes(C, ff, K).items():
                s[f"{stack}.layers.{n}.{k}"] = shape
    return s


def expected_shapes(variant, vocab):
    F = 100
    s = {"embed.weight": (vocab, 192)}
    s.update(zipformer_shapes("text_encoder", 192, F, 192, 512, [1], [4], [9]))
    stereo = variant == "stereo"
    s.update(zipformer_shapes(
        "fm_decoder", (5 * F, 3 * F) if stereo else 3 * F, (2 * F, F) if stereo else F, 512, 1536,
        [1, 2, 4, 2, 1], [2, 2, 4, 4, 4], [31, 15, 7, 15, 31], time_embed_dim=192, stereo=stereo))
    if variant != "zipvoice":
        s["spk_embed.weight"] = (2, F)
    return s


def build_meta(cls, vocab, **kw):
    with torch.device("meta"):
        return cls(**BASE_MODEL_CONFIG, vocab_size=vocab, pad_id=0, **kw)


CASES = [
    ("zipvoice", ZipVoice, V_ZIPVOICE, 889, 122_664_804, {}),
    ("dialog", ZipVoiceDialog, V_DIALOG, 890, 122_670_380, {"spk_a_id": 360, "spk_b_id": 361}),
    ("stereo", ZipVoiceDialogStereo, V_DIALOG, 894, 123_029_492, {"spk_a_id": 360, "spk_b_id": 361}),
]


def test_distill_is_zipvoice_plus_the_guidance_scale_embedding():
    """ZipVoice-Distill: 122,701,668 parameters (fact sheet 3); the dialog variants gain the same
    (192, 192) bias-free `fm_decoder.guidance_scale_embed.weight`."""
    from model.zipvoice import ZipVoiceDialogDistill, ZipVoiceDistill

    key = "fm_decoder.guidance_scale_embed.weight"
    for cls, base, vocab, kw, n_params in (
            (ZipVoiceDistill, ZipVoice, V_ZIPVOICE, {}, 122_701_668),
            (ZipVoiceDialogDistill, ZipVoiceDialog, V_DIALOG, {"spk_a_id": 360, "spk_b_id": 361},
             122_670_380 + 192 * 192)):
        got = {k: tuple(v.shape) for k, v in build_meta(cls, vocab, **kw).state_dict().items()}
        plain = {k: tuple(v.shape) for k, v in build_meta(base, vocab, **kw).state_dict().items()}
        assert got == {**plain, key: (192, 192)}
        assert sum(torch.Size(s).numel() for s in got.values()) == n_params


@pytest.mark.parametrize("variant,cls,vocab,n_keys,n_params,kw", CASES, ids=[c[0] for c in CASES])
def test_state_dict_matches_reference_layout(variant, cls, vocab, n_keys, n_params, kw):
    expected = expected_shapes(variant, vocab)
    assert len(expected) == n_keys
    assert sum(torch.Size(s).numel() for s in expected.values()) == n_params

    model = build_meta(cls, vocab, **kw)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert list(model.buffers()) == []  # the reference state dicts hold no buffers


def test_prefix_counts_and_stack_wrapping():
    keys = list(build_meta(ZipVoice, V_ZIPVOICE).state_dict())
    assert sum(k.startswith("text_encoder.") for k in keys) == 176
    assert sum(k.startswith("fm_decoder.") for k in keys) == 712
    # stacks 0 and 4 unwrapped, 1-3 wrapped (factors 2, 4, 2); the text encoder has no time_emb
    assert "fm_decoder.encoders.0.layers.1.norm.log_scale" in keys
    assert "fm_decoder.encoders.4.time_emb.1.weight" in keys
    assert "fm_decoder.encoders.2.encoder.layers.3.bypass.bypass_scale" in keys
    assert "fm_decoder.encoders.2.layers.0.bypass.bypass_scale" not in keys
    assert not any("time_emb" in k for k in keys if k.startswith("text_encoder."))


def test_base_config_file_has_the_18_reference_keys():
    cfg = json.loads((REPO / "configs/model/zipvoice_base.json").read_text())
    assert cfg["feature"] == {"sampling_rate": 24000, "type": "vocos"}
    assert len(cfg["model"]) == 18
    assert cfg["model"] == BASE_MODEL_CONFIG
    assert cfg["model"]["fm_decoder_downsampling_factor"] == [1, 2, 4, 2, 1]
    assert cfg["model"]["pos_dim"] == 48 and cfg["model"]["value_head_dim"] == 12


def test_tiny_config_exercises_wrapped_stacks():
    cfg = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())["model"]
    assert set(cfg) == set(BASE_MODEL_CONFIG)
    assert any(ds > 1 for ds in cfg["fm_decoder_downsampling_factor"])
    model = ZipVoice(**cfg, vocab_size=10, pad_id=0)
    assert any(".encoder.layers." in k for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < 500_000
