"""Checkpoint I/O in the official format and the curriculum initialisations (tiny models)."""

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    build_model,
    detect_variant,
    init_dialog_from_zipvoice,
    init_stereo_from_dialog,
    load_model,
    load_state_dict,
    read_model_config,
    save_model,
)
from model.tokenizer import read_tokens
from model.zipvoice import BASE_MODEL_CONFIG, ZipVoiceConfig

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())
V0 = 40



def mono_tokens() -> dict[str, int]:
    return {"_": 0, **{f"t{i}": i for i in range(1, V0)}}


def dialog_tokens() -> dict[str, int]:
    extra = ["[S1]", "[S2]"] + [f"x{i}" for i in range(26)]
    table = mono_tokens()
    for tok in extra:
        table[tok] = len(table)
    return table


def probe(model, width=300, seed=0):
    """Decoder velocity and text-encoder output on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 20, width, generator=g)
    mask = torch.arange(20)[None] >= torch.tensor([[20], [14]])
    w = torch.tensor([1.5, 3.0]) if model.distilled else None
    with torch.no_grad():
        v = model.fm_decoder(x, torch.tensor([0.3, 0.8]), mask, w)
        s1 = V0 if model.vocab_size > V0 else 1  # [S1] for dialog tables
        txt, _ = model.forward_text_embed([[s1, 3, 4, s1 + 1, 5], [s1, 6]])
    return v, txt


@pytest.mark.parametrize("variant", ["zipvoice", "zipvoice_dialog", "zipvoice_dialog_stereo",
                                     "zipvoice_distill", "zipvoice_dialog_distill",
                                     "zipvoice_dialog_stereo_distill"])
@pytest.mark.parametrize("filename", ["model.pt", "model.safetensors"])
def test_round_trip_official_format(tmp_path, variant, filename):
    tokens = dialog_tokens() if variant.startswith("zipvoice_dialog") else mono_tokens()
    torch.manual_seed(0)
    model = build_model(variant, TINY, tokens).eval()
    save_model(model, tmp_path, tokens, filename=filename)

    config = json.loads((tmp_path / "model.json").read_text())
    assert config["feature"] == {"sampling_rate": 24000, "type": "vocos"}
    assert list(config["model"]) == list(BASE_MODEL_CONFIG)  # the 18 keys, reference order
    assert read_tokens(tmp_path / "tokens.txt") == tokens
    if filename == "model.pt":
        raw = torch.load(tmp_path / "model.pt", weights_only=True)
        assert list(raw) == ["model"]

    loaded = load_model(tmp_path)
    assert loaded.variant == variant and type(loaded.model) is type(model)
    assert not loaded.model.training
    sd0, sd1 = model.state_dict(), loaded.model.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    if variant.startswith("zipvoice_dialog"):
        assert (loaded.model.spk_a_id, loaded.model.spk_b_id) == (V0, V0 + 1)
    assert loaded.model.distilled == variant.endswith("_distill")
    width = 500 if "stereo" in variant else 300
    a, b = probe(model, width), probe(loaded.model, width)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_load_strips_ddp_prefix_and_accepts_a_file_path(tmp_path):
    model = build_model("zipvoice_dialog", TINY, dialog_tokens())
    save_model(model, tmp_path, dialog_tokens())
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "ddp.pt")
    loaded = load_model(tmp_path / "ddp.pt")  # model.json and tokens.txt are found beside it
    assert loaded.variant == "zipvoice_dialog"
    assert torch.equal(loaded.model.spk_embed.weight, model.spk_embed.weight)


def test_variant_detection():
    sd = {"embed.weight": 0, "fm_decoder.in_proj.weight": 0}
    assert detect_variant(sd) == "zipvoice"
    assert detect_variant({**sd, "spk_embed.weight": 0}) == "zipvoice_dialog"
    stereo = {"embed.weight": 0, "spk_embed.weight": 0, "fm_decoder.in_proj.0.weight": 0}
    assert detect_variant(stereo) == "zipvoice_dialog_stereo"
    gs = {"fm_decoder.guidance_scale_embed.weight": 0}
    assert detect_variant({**sd, **gs}) == "zipvoice_distill"  # the reference's ZipVoice-Distill
    assert detect_variant({**sd, "spk_embed.weight": 0, **gs}) == "zipvoice_dialog_distill"
    assert detect_variant({**stereo, **gs}) == "zipvoice_dialog_stereo_distill"
    with pytest.raises(ValueError, match="not a ZipVoice"):
        detect_variant({"foo": 0})


def test_bad_inputs_fail_with_the_file_named(tmp_path):
    model = build_model("zipvoice", TINY, mono_tokens())
    save_model(model, tmp_path, mono_tokens())
    # tokens.txt that does not match the embedding
    (tmp_path / "tokens.txt").write_text("".join(f"t{i}\t{i}\n" if i else "_\t0\n" for i in range(V0 + 3)))
    with pytest.raises(ValueError, match="embed.weight has 40 rows.*tokens.txt"):
        load_model(tmp_path)
    # model.json with a missing key
    cfg = json.loads((tmp_path / "model.json").read_text())
    del cfg["model"]["pos_dim"]
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.json.*missing keys \['pos_dim'\]"):
        read_model_config(tmp_path / "model.json")
    # a wrong value names the file and the key (ZipVoiceConfig validates), not a failing layer
    for key, value, why in [("pos_dim", 0, "positive integer"), ("fm_decoder_num_layers", [2, 2], "4 positive"),
                            ("text_encoder_dim", True, "positive integer")]:
        bad = json.loads(json.dumps(TINY))
        bad["model"][key] = value
        (tmp_path / "model.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"model\.json: model\.{key} must be .*{why}"):
            read_model_config(tmp_path / "model.json")
    # a pickle that needs code to load is refused, never executed
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Path("/x")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt.*weights_only"):
        load_state_dict(tmp_path / "evil.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no model.pt"):
        load_model(tmp_path / "empty")


def test_init_dialog_from_zipvoice_copies_every_weight():
    torch.manual_seed(0)
    mono = build_model("zipvoice", TINY, mono_tokens())
    torch.manual_seed(1)
    dialog = build_model("zipvoice_dialog", TINY, dialog_tokens())
    init_dialog_from_zipvoice(dialog, {"module." + k: v for k, v in mono.state_dict().items()},
                              generator=torch.Generator().manual_seed(0))
    ms, ds = mono.state_dict(), dialog.state_dict()
    assert set(ds) - set(ms) == {"spk_embed.weight"}
    for k, v in ms.items():
        if k == "embed.weight":
            assert torch.equal(ds[k][:V0], v)
        else:
            assert torch.equal(ds[k], v), k
    fresh = ds["embed.weight"][V0:]
    assert fresh.shape[0] == 28 and 0.85 < fresh.std().item() < 1.15
    assert 0.07 < ds["spk_embed.weight"].std().item() < 0.13

    wrong = build_model("zipvoice_dialog", TINY, {**dialog_tokens(), "extra": V0 + 28})
    with pytest.raises(ValueError, match="exactly 28"):
        init_dialog_from_zipvoice(wrong, ms)
    with pytest.raises(ValueError, match="monologue"):
        init_dialog_from_zipvoice(dialog, ds)


def test_init_stereo_from_dialog_keeps_weights_and_predicts_channel_average():
    torch.manual_seed(0)
    dialog = build_model("zipvoice_dialog", TINY, dialog_tokens()).eval()
    with torch.no_grad():  # non-trivial biases so that bias handling is checked too
        dialog.fm_decoder.in_proj.bias.normal_()
        dialog.fm_decoder.out_proj.bias.normal_()
    stereo = build_model("zipvoice_dialog_stereo", TINY, dialog_tokens()).eval()
    init_stereo_from_dialog(stereo, dialog.state_dict())

    d, s = dialog.state_dict(), stereo.state_dict()
    heads = ("fm_decoder.in_proj", "fm_decoder.out_proj")
    assert len(s) == len(d) + 4
    for k, v in d.items():
        if not k.startswith(heads):
            assert torch.equal(s[k], v), k
    for p in ("in_proj", "out_proj"):
        for q in ("weight", "bias"):
            assert torch.equal(s[f"fm_decoder.{p}.1.{q}"], d[f"fm_decoder.{p}.{q}"])
    w = d["fm_decoder.in_proj.weight"]
    w0 = s["fm_decoder.in_proj.0.weight"]
    assert torch.equal(w0[:, 0:100], w[:, :100] / 2) and torch.equal(w0[:, 100:200], w[:, :100] / 2)
    assert torch.equal(w0[:, 200:300], w[:, 100:200])
    assert torch.equal(w0[:, 300:400], w[:, 200:] / 2) and torch.equal(w0[:, 400:], w[:, 200:] / 2)

    # the stereo head sees the channel average and predicts the dialog velocity on both channels
    g = torch.Generator().manual_seed(3)
    T = 24
    xa, xb, sa, sb = (torch.randn(2, T, 100, generator=g) for _ in range(4))
    text = torch.randn(2, T, 100, generator=g)
    mask = torch.arange(T)[None] >= torch.tensor([[T], [17]])
    t = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        v_st = stereo.forward_fm_decoder(t, torch.cat([xa, xb], -1), text,
                                         torch.cat([sa, sb], -1), mask)
        v_mono = dialog.forward_fm_decoder(t, (xa + xb) / 2, text, (sa + sb) / 2, mask)
        v_head1 = stereo.forward_fm_decoder(t, xa, text, sa, mask)
        v_dialog = dialog.forward_fm_decoder(t, xa, text, sa, mask)
    assert v_st.shape[-1] == 200
    assert torch.allclose(v_st[..., :100], v_mono, atol=1e-4)
    assert torch.allclose(v_st[..., 100:], v_mono, atol=1e-4)
    assert torch.equal(v_head1, v_dialog)


def test_zipvoice_config_holds_the_hyper_parameters_once():
    """model.json's "model" section <-> ZipVoiceConfig <-> the model, without loss."""
    cfg = ZipVoiceConfig.from_dict(TINY["model"], "zipvoice_tiny.json")
    assert cfg.to_dict() == TINY["model"] and list(cfg.to_dict()) == list(BASE_MODEL_CONFIG)
    assert ZipVoiceConfig().to_dict() == BASE_MODEL_CONFIG and len(BASE_MODEL_CONFIG) == 18
    model = build_model("zipvoice", TINY, mono_tokens())
    assert model.config == cfg
    with pytest.raises(ValueError, match=r"x\.json: 'model' section: missing keys \[\], unknown keys \['depth'\]"):
        ZipVoiceConfig.from_dict({**TINY["model"], "depth": 3}, "x.json")
