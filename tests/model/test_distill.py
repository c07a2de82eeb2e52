"""ZipVoice-Dialog-Distill at tiny size: the guidance-scale embedding, the one-pass sampler and
the distillation objective (the two-stage training runs are in test_train.py)."""

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import build_model
from model.distill import DistillObjective, teacher_target
from model.sampling import guided_velocity
from model.zipformer import timestep_embedding

REPO = Path(__file__).resolve().parents[2]
TINY = json.loads((REPO / "configs/model/zipvoice_tiny.json").read_text())
BASE = json.loads((REPO / "configs/model/zipvoice_base.json").read_text())
TOKENS = {"_": 0, "[S1]": 1, "[S2]": 2, **{f"t{i}": i for i in range(3, 20)}}


def models(variant="zipvoice_dialog"):
    torch.manual_seed(0)
    teacher = build_model(variant, TINY, TOKENS).eval()
    student = build_model(variant + "_distill", TINY, TOKENS)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["fm_decoder.guidance_scale_embed.weight"] and not unexpected
    return teacher, student.eval()


def test_guidance_scale_embedding_key_and_shape_at_base_size():
    with torch.device("meta"):
        model = build_model("zipvoice_dialog_distill", BASE, {**TOKENS, **{f"x{i}": 20 + i for i in range(368)}})
    sd = model.state_dict()
    assert sd["fm_decoder.guidance_scale_embed.weight"].shape == (192, 192)
    assert "fm_decoder.guidance_scale_embed.bias" not in sd
    assert len(sd) == 891  # ZipVoice-Dialog's 890 keys + the embedding
    with torch.device("meta"):
        stereo = build_model("zipvoice_dialog_stereo_distill", BASE, {**TOKENS, **{f"x{i}": 20 + i for i in range(368)}})
    assert len(stereo.state_dict()) == 895


def test_guidance_scale_is_added_to_the_time_sinusoid():
    _, student = models()
    dec = student.fm_decoder
    t, w = torch.tensor([0.2, 0.7]), torch.tensor([1.5, 0.0])
    expected = dec.time_embed(timestep_embedding(t, 16) + dec.guidance_scale_embed(timestep_embedding(w, 16)))
    torch.testing.assert_close(dec.embed_time(t, 2, torch.float32, w), expected)
    # a scalar w is broadcast over the batch; the scale changes the embedding
    torch.testing.assert_close(dec.embed_time(t, 2, torch.float32, 1.5)[0], expected[0])
    assert not torch.allclose(dec.embed_time(t, 2, torch.float32, 3.0), dec.embed_time(t, 2, torch.float32, 1.5))
    with pytest.raises(ValueError, match="guidance scale"):
        dec.embed_time(t, 2, torch.float32)
    teacher, _ = models()
    with pytest.raises(ValueError, match="no guidance-scale embedding"):
        teacher.fm_decoder.embed_time(t, 2, torch.float32, 1.5)


def test_distilled_model_runs_one_pass_per_step():
    _, student = models()
    calls = []
    student.fm_decoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    xt = torch.randn(2, 12, 100)
    text, speech = torch.randn(2, 12, 100), torch.zeros(2, 12, 100)
    v = guided_velocity(student, 0.3, xt, text, speech, None, 1.5)
    assert calls == [2]  # no CFG doubling
    v_w = student.forward_fm_decoder(0.3, xt, text, speech, None, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(v, v_w)


def test_teacher_target_is_two_euler_steps_with_cfg():
    teacher, _ = models()
    g = torch.Generator().manual_seed(1)
    xt, text = torch.randn(2, 10, 100, generator=g), torch.randn(2, 10, 100, generator=g)
    speech = torch.randn(2, 10, 100, generator=g) * (torch.arange(10) < 4)[None, :, None]
    mask = torch.zeros(2, 10, dtype=torch.bool)
    w = torch.tensor([0.5, 1.8]).reshape(2, 1, 1)
    t, d1, d2 = 0.4, 0.2, 0.25  # the second step crosses t = 0.5: the CFG mode switches
    with torch.no_grad():
        v1 = guided_velocity(teacher, t, xt, text, speech, mask, w)
        x2 = xt + v1 * d1 + guided_velocity(teacher, t + d1, xt + v1 * d1, text, speech, mask, w) * d2
        target = teacher_target(teacher, t, d1, d2, xt, text, speech, mask, w)
    torch.testing.assert_close(target, (x2 - xt) / (d1 + d2), atol=1e-5, rtol=1e-5)
    # per-utterance w: each row is guided with its own scale
    with torch.no_grad():
        row1 = guided_velocity(teacher, t, xt[1:], text[1:], speech[1:], mask[1:], 1.8)
    torch.testing.assert_close(v1[1:], row1)
    assert torch.equal(teacher_target(teacher, 0.99, 0.0, 0.0, xt, text, speech, mask, w),
                       guided_velocity(teacher, 0.99, xt, text, speech, mask, w))


@pytest.mark.parametrize("variant", ["zipvoice_dialog", "zipvoice_dialog_stereo"])
def test_objective_trains_only_the_student_and_ema_follows_it(variant):
    teacher, student = models(variant)
    student.train()
    obj = DistillObjective(student, teacher, "first")
    width = 200 if variant.endswith("stereo") else 100
    feats = torch.randn(2, 30, width) * 0.3
    out = obj([[1, 3, 4, 2, 5], [1, 6, 2, 7]], feats, torch.tensor([30, 22]),
              generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["num_frames"] > 0 and torch.isfinite(out["fm_loss"])
    assert student.fm_decoder.guidance_scale_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    # in eval mode the same generator gives the same draw (validation is reproducible)
    obj.eval()
    with torch.no_grad():
        a, b = (float(obj([[1, 3, 4, 2, 5], [1, 6, 2, 7]], feats, torch.tensor([30, 22]),
                          generator=torch.Generator().manual_seed(s))["loss"]) for s in (0, 0))
        c = float(obj([[1, 3, 4, 2, 5], [1, 6, 2, 7]], feats, torch.tensor([30, 22]),
                      generator=torch.Generator().manual_seed(1))["loss"])
    assert a == b != c
    # stage two: EMA teacher moves towards the student
    ema = DistillObjective.with_ema_teacher(student, ema_decay=0.75)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = ema.teacher.embed.weight.clone()
    ema.update_teacher()
    torch.testing.assert_close(ema.teacher.embed.weight, 0.75 * before + 0.25 * student.embed.weight)
    with pytest.raises(ValueError, match="guidance-scale embedding"):
        DistillObjective(teacher, teacher)
