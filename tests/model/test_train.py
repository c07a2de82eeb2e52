"""The trainer on tiny models and generated dialogues (CPU): the loss goes down, a killed run
resumes bit-exactly, the curriculum init, ScaledAdam and the schedules, averaging, the stereo
stage under 2-process DDP, monologue pre-training with Eden and bf16, and inference on the
trained folder."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from model.average import average_checkpoints
from model.average import main as average_main
from model.checkpoint import build_model, load_model, load_state_dict, read_model_config, save_model
from model.optim import Eden, FixedLR, ScaledAdam, grad_scale_update
from model.prepare import main as prepare_main
from model.tokenizer import read_tokens
from model.train import build_for_stage, init_model, load_config, train, update_model_avg
from test_data import make_corpus, make_token_files

REPO = Path(__file__).resolve().parents[2]
TINY_JSON = REPO / "configs/model/zipvoice_tiny.json"
N_STEPS, SAVE_EVERY, KILL_AT = 16, 8, 11



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generated corpus, token tables and a tiny random ZipVoice (the curriculum's stage 1)."""
    root = tmp_path_factory.mktemp("train")
    manifest = make_corpus(root / "export", 6)
    mono_tokens, dialog_tokens = make_token_files(root)
    torch.manual_seed(0)
    zipvoice = build_model("zipvoice", read_model_config(TINY_JSON), read_tokens(mono_tokens))
    save_model(zipvoice, root / "zipvoice", read_tokens(mono_tokens))
    return {"root": root, "manifest": manifest, "dialog_tokens": dialog_tokens,
            "mono_tokens": mono_tokens, "zipvoice": root / "zipvoice"}


def tiny_config(setup, exp: Path, **sections) -> dict:
    raw = yaml.safe_load((REPO / "configs/train_tiny.yaml").read_text())
    raw["exp_dir"] = str(exp)
    raw["model"].update(init_checkpoint=str(setup["zipvoice"]), token_file=str(setup["dialog_tokens"]))
    raw["data"]["train"] = [{"name": "tiny", "manifest": str(setup["manifest"])}]
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


def read_metrics(exp: Path) -> list[dict]:
    return [json.loads(x) for x in (exp / "log" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dialog_runs(setup):
    """Run A: N_STEPS straight. Run B: killed after KILL_AT (last checkpoint at SAVE_EVERY),
    then resumed to N_STEPS. Both read features from a store built by model.prepare."""
    root = setup["root"]
    store_cfg = root / "prepare.yaml"
    raw = tiny_config(setup, root / "unused", data={"feature_store": str(root / "fbank")})
    store_cfg.write_text(yaml.safe_dump(raw))
    assert prepare_main(["--config", str(store_cfg), "--dtype", "float32"]) == 0
    common = dict(data={"feature_store": str(root / "fbank"), "max_duration": 8.0},
                  train={"num_iters": N_STEPS, "save_every_n": SAVE_EVERY, "valid_every_n": SAVE_EVERY})
    a = train(load_config(raw=tiny_config(setup, root / "expA", **common)))
    cfg_b = load_config(raw=tiny_config(setup, root / "expB", **common))
    killed = train(cfg_b, stop_after=KILL_AT)
    resumed = train(cfg_b)
    return {"A": a, "killed": killed, "resumed": resumed}


def test_dialog_loss_goes_down(dialog_runs):
    a = dialog_runs["A"]
    losses = [a.losses[s] for s in range(1, N_STEPS + 1)]
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.75 * first, losses
    # held-out loss (deterministic t_b = b/B, fixed noise and masks) also drops
    assert sorted(a.valid) == [SAVE_EVERY, N_STEPS]
    assert a.valid[N_STEPS] < a.valid[SAVE_EVERY]


def test_killed_run_resumes_with_the_same_loss_curve(dialog_runs):
    a, killed, resumed = dialog_runs["A"], dialog_runs["killed"], dialog_runs["resumed"]
    assert killed.stopped_early and killed.batch_idx_train == KILL_AT
    assert resumed.batch_idx_train == N_STEPS and not resumed.stopped_early
    # the resumed process redid SAVE_EVERY+1..N from checkpoint-SAVE_EVERY: bit-identical
    assert sorted(resumed.losses) == list(range(SAVE_EVERY + 1, N_STEPS + 1))
    for step in range(SAVE_EVERY + 1, N_STEPS + 1):
        assert resumed.losses[step] == a.losses[step], step
    assert resumed.valid[N_STEPS] == a.valid[N_STEPS]
    # the work lost by the kill was identical too, and the log holds each step once
    for step in range(SAVE_EVERY + 1, KILL_AT + 1):
        assert killed.losses[step] == a.losses[step]
    steps = [r["step"] for r in read_metrics(a.exp_dir.parent / "expB") if "loss" in r]
    assert steps == list(range(1, N_STEPS + 1))
    ca = torch.load(a.exp_dir / f"checkpoint-{N_STEPS}.pt", weights_only=True)
    cb = torch.load(resumed.exp_dir / f"checkpoint-{N_STEPS}.pt", weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["model_avg"][k], cb["model_avg"][k]) for k in ca["model_avg"])
    assert ca["sampler"] == cb["sampler"]


def test_experiment_folder_is_a_model_folder(dialog_runs, setup):
    exp = dialog_runs["A"].exp_dir
    assert list(torch.load(exp / "model.pt", weights_only=True)) == ["model"]
    loaded = load_model(exp)
    assert loaded.variant == "zipvoice_dialog"
    assert loaded.token2id == read_tokens(setup["dialog_tokens"])
    # the exported model.pt is the average over the last interval (export_avg: 1) ...
    sd, _ = average_checkpoints(exp, iteration=N_STEPS, avg=1)
    assert all(torch.equal(loaded.model.state_dict()[k], sd[k]) for k in sd)
    # ... which is not the final weights
    final = torch.load(exp / f"checkpoint-{N_STEPS}.pt", weights_only=True)["model"]
    assert not all(torch.equal(final[k], sd[k]) for k in sd)
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    log_text = (exp / "log" / "train.log").read_text()
    assert "curriculum init from ZipVoice" in log_text and "validation at update" in log_text


def test_infer_cli_on_the_trained_folder(dialog_runs, setup, tmp_path):
    exp = dialog_runs["A"].exp_dir
    first = json.loads(setup["manifest"].read_text().splitlines()[2])
    out = tmp_path / "gen.wav"
    cmd = [sys.executable, "-m", "model.infer", "--checkpoint", str(exp), "--vocoder", "griffin-lim",
           "--prompt-wav", str(setup["manifest"].parent / first["path"]), "--prompt-text", first["text"],
           "--text", "[S1] Good morning. [S2] Hello, how are you?", "--out", str(out),
           "--num-step", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wave, sr = sf.read(out)
    assert sr == 24000 and wave.ndim == 1 and len(wave) > 2400 and np.isfinite(wave).all()


# --------------------------------------------------------------------------------------------
# Distill (ZipVoice-Dialog-Distill, two stages)
# --------------------------------------------------------------------------------------------

D1_STEPS, D2_STEPS = 12, 4


def _gap_inputs(setup, token_file):
    """Three dev dialogues: the first 1.6 s as prompt, the rest of the text as the target."""
    from model.features import FEAT_SCALE, VocosFbank, load_audio
    from model.tokenizer import get_tokenizer

    tok = get_tokenizer("dialog", token_file)
    prompts, prompt_tokens, tokens, frames = [], [], [], []
    for line in setup["manifest"].read_text().splitlines()[:3]:
        item = json.loads(line)
        feats = VocosFbank().extract(load_audio(setup["manifest"].parent / item["path"]), 24000)
        prompts.append(feats[:150] * FEAT_SCALE)
        ids = tok.texts_to_token_ids([item["text"]])[0]
        prompt_tokens.append(ids[: len(ids) // 2])
        tokens.append(ids[len(ids) // 2:])
        frames.append(feats.shape[0] - 150)
    return tokens, prompt_tokens, torch.stack(prompts), torch.tensor([150] * 3), frames


@pytest.fixture(scope="module")
def distill_runs(dialog_runs, setup):
    """Stage 1 from the trained dialog folder (CFG teacher), stage 2 from the stage-1 folder
    (EMA teacher); the 4-step gap to the teacher's 16-step output before and after each."""
    from model.distill import few_step_gap

    root = setup["root"] / "distill"
    teacher_dir = dialog_runs["A"].exp_dir
    teacher = load_model(teacher_dir).model
    inputs = _gap_inputs(setup, teacher_dir / "tokens.txt")
    student = build_model("zipvoice_dialog_distill", read_model_config(teacher_dir / "model.json"),
                          read_tokens(teacher_dir / "tokens.txt"))
    student.load_state_dict(teacher.state_dict(), strict=False)
    gaps = {"init": few_step_gap(student.eval(), teacher, *inputs)}
    runs = {}
    for stage, init, steps, lr in (("first", teacher_dir, D1_STEPS, 0.05),
                                   ("second", root / "first", D2_STEPS, 0.01)):
        raw = tiny_config(setup, root / stage, stage="distill",
                          model={"init_checkpoint": str(init), "token_file": None, "config": None},
                          optim={"lr": lr},
                          train={"num_iters": steps, "save_every_n": steps // 2,
                                 "valid_every_n": steps // 2, "export_avg": 0},
                          distill={"stage": stage, "ema_decay": 0.9})
        raw["data"]["max_duration"] = 8.0
        runs[stage] = train(load_config(raw=raw))
        gaps[stage] = few_step_gap(load_model(root / stage).model, teacher, *inputs)
    return {"runs": runs, "gaps": gaps, "root": root, "teacher": teacher_dir}


def test_distilled_few_step_output_approaches_the_teacher(distill_runs):
    gaps = distill_runs["gaps"]
    # 4 steps without CFG vs the teacher's 16 CFG steps: the gap shrinks with training
    assert gaps["first"] < 0.6 * gaps["init"], gaps
    assert gaps["second"] < 0.6 * gaps["init"], gaps
    first, second = distill_runs["runs"]["first"], distill_runs["runs"]["second"]
    assert sorted(first.losses) == list(range(1, D1_STEPS + 1)) and len(first.valid) == 2
    # stage 2 starts from stage 1's weights and its EMA teacher travels in the checkpoint
    ckpt = torch.load(second.exp_dir / f"checkpoint-{D2_STEPS}.pt", weights_only=True)
    assert ckpt["variant"] == "zipvoice_dialog_distill" and ckpt["stage"] == "distill"
    assert set(ckpt["model_ema"]) == set(ckpt["model"])
    assert not torch.equal(ckpt["model_ema"]["fm_decoder.guidance_scale_embed.weight"],
                           ckpt["model"]["fm_decoder.guidance_scale_embed.weight"])
    log_text = (first.exp_dir / "log" / "train.log").read_text()
    assert "distill stage 1: student = teacher" in log_text


def test_distill_stage_checks_its_init_checkpoint(distill_runs, setup, tmp_path):
    wrong = [("first", distill_runs["root"] / "first", "distill.stage=second"),
             ("second", distill_runs["teacher"], "not a distilled model")]
    for stage, init, message in wrong:
        raw = tiny_config(setup, tmp_path / stage, stage="distill", distill={"stage": stage},
                          model={"init_checkpoint": str(init), "token_file": None, "config": None})
        with pytest.raises(ValueError, match=message):
            train(load_config(raw=raw))


def test_infer_cli_on_the_distilled_folder(distill_runs, setup, tmp_path):
    exp = distill_runs["runs"]["second"].exp_dir
    loaded = load_model(exp)
    assert loaded.variant == "zipvoice_dialog_distill"
    first = json.loads(setup["manifest"].read_text().splitlines()[2])
    out = tmp_path / "gen.wav"
    cmd = [sys.executable, "-m", "model.infer", "--checkpoint", str(exp), "--vocoder", "griffin-lim",
           "--prompt-wav", str(setup["manifest"].parent / first["path"]), "--prompt-text", first["text"],
           "--text", "[S1] Good morning. [S2] Hello, how are you?", "--out", str(out),
           "--num-step", "4", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wave, sr = sf.read(out)
    assert sr == 24000 and wave.ndim == 1 and len(wave) > 2400 and np.isfinite(wave).all()


# --------------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------------


def test_curriculum_init_copies_zipvoice_and_extends_the_vocabulary(setup, tmp_path):
    cfg = load_config(raw=tiny_config(setup, tmp_path / "exp"))
    token2id = read_tokens(setup["dialog_tokens"])
    model = build_for_stage(cfg, read_model_config(TINY_JSON), token2id)
    init_model(cfg, model)
    src = load_state_dict(setup["zipvoice"] / "model.pt")
    sd = model.state_dict()
    v0 = src["embed.weight"].shape[0]
    assert sd["embed.weight"].shape[0] == v0 + 28 == len(token2id)
    assert torch.equal(sd["embed.weight"][:v0], src["embed.weight"])
    assert sd["embed.weight"][v0:].std() > 0.5  # fresh N(0, 1) rows
    assert sd["spk_embed.weight"].shape == (2, 100)
    assert set(sd) - set(src) == {"spk_embed.weight"}
    assert all(torch.equal(sd[k], src[k]) for k in src if k != "embed.weight")
    # the ZipVoice token table instead of the dialog one: refused
    bad = load_config(raw=tiny_config(setup, tmp_path / "e2", model={"token_file": str(setup["mono_tokens"])}))
    with pytest.raises(ValueError, match="token"):
        m = build_for_stage(bad, read_model_config(TINY_JSON), read_tokens(setup["mono_tokens"]))
        init_model(bad, m)
    none = load_config(raw=tiny_config(setup, tmp_path / "e3", model={"init_checkpoint": None}))
    with pytest.raises(ValueError, match="needs model.init_checkpoint"):
        init_model(none, model)


# --------------------------------------------------------------------------------------------
# Optimizer, schedules, averaging, config
# --------------------------------------------------------------------------------------------


def test_scaled_adam_updates_are_relative_to_parameter_rms():
    big = torch.nn.Parameter(torch.randn(50, 40) * 2.0)
    small = torch.nn.Parameter(big.detach() * 0.01)
    scalar = torch.nn.Parameter(torch.tensor(0.5))
    opt = ScaledAdam([big, small, scalar], lr=0.01, clipping_scale=None)
    b0, s0, c0 = big.detach().clone(), small.detach().clone(), scalar.detach().clone()
    g = torch.randn(50, 40)
    big.grad, small.grad, scalar.grad = g.clone(), g.clone(), torch.tensor(1.0)
    opt.step()
    rel_big = (big.detach() - b0).abs().mean() / b0.pow(2).mean().sqrt()
    rel_small = (small.detach() - s0).abs().mean() / s0.pow(2).mean().sqrt()
    assert rel_big == pytest.approx(float(rel_small), rel=1e-4)
    # first step: |update| = lr * (1 - beta1) * rms (Adam-normalised, no momentum correction)
    assert rel_big == pytest.approx(0.01 * 0.1, rel=1e-3)
    # scalars: plain Adam with lr * scalar_lr_scale
    assert float(c0 - scalar.detach()) == pytest.approx(0.01 * 0.1 * 0.1, rel=1e-3)


def test_scaled_adam_clips_at_twice_the_median_norm_and_resumes_exactly():
    torch.manual_seed(0)
    target = torch.randn(8, 4)

    def make():
        torch.manual_seed(1)
        lin = torch.nn.Linear(4, 8)
        return lin, ScaledAdam(lin.parameters(), lr=0.1, clipping_update_period=10)

    def step(lin, opt, i, scale=1.0):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        loss = ((lin(x) - x @ target.T) ** 2).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()) / scale

    lin, opt = make()
    losses = [step(lin, opt, i) for i in range(60)]
    assert losses[-1] < 0.1 * losses[0]  # it optimises (the weight scale is learned: RMS 0.3 -> 1)
    first = opt.state[lin.weight]
    norms = first["model_norms"].sort().values
    assert float(first["model_norm_threshold"]) == pytest.approx(2.0 * float(norms[5]), rel=0.5)
    before = first["num_clipped"]
    step(lin, opt, 60, scale=1e4)  # a huge gradient is clipped
    assert first["num_clipped"] == before + 1
    # state_dict round trip: continuing from a saved state is bit-identical
    a, oa = make()
    for i in range(25):
        step(a, oa, i)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b, ob = make()
    b.load_state_dict(saved["model"])
    ob.load_state_dict(saved["opt"])
    for i in range(25, 35):
        assert step(a, oa, i) == step(b, ob, i)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_lr_schedules_and_grad_scale_rule():
    p = torch.nn.Parameter(torch.zeros(3))
    eden = Eden(ScaledAdam([p], lr=0.02), lr_batches=7500, lr_epochs=3.5, warmup_batches=500)
    assert eden.get_last_lr()[0] == pytest.approx(0.01)  # warm-up starts at 0.5
    eden.step_batch(250)
    assert eden.get_last_lr()[0] == pytest.approx(0.02 * 0.75 * (1 + (250 / 7500) ** 2) ** -0.25)
    eden.step_batch(30000)
    eden.step_epoch(7)
    expect = 0.02 * ((30000 ** 2 + 7500 ** 2) / 7500 ** 2) ** -0.25 * ((49 + 3.5 ** 2) / 3.5 ** 2) ** -0.25
    assert eden.get_last_lr()[0] == pytest.approx(expect)
    sd = eden.state_dict()
    again = Eden(ScaledAdam([p], lr=0.02))
    again.load_state_dict(sd)
    assert again.get_last_lr() == eden.get_last_lr()
    fixed = FixedLR(ScaledAdam([p], lr=1e-4))
    fixed.step_batch(59999)
    assert fixed.get_last_lr() == [1e-4]
    assert grad_scale_update(8.0, 100) == 16.0 and grad_scale_update(8.0, 150) is None
    assert grad_scale_update(2048.0, 100) is None and grad_scale_update(2048.0, 400) == 4096.0
    assert grad_scale_update(8192.0, 400) is None


def test_average_is_the_mean_of_the_weights_over_the_range(tmp_path):
    period = 100
    snaps = [{"w": torch.full((3,), float(k) ** 2), "b": torch.tensor([float(k)])} for k in range(1, 7)]
    model_avg = {k: v.to(torch.float64).clone() for k, v in snaps[0].items()}

    class Snap(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            self.sd = sd

        def state_dict(self):
            return self.sd

    for i, sd in enumerate(snaps, start=1):
        update_model_avg(model_avg, Snap(sd), i * period, period)
        if i % 2 == 0:
            torch.save({"model": sd, "model_avg": {k: v.clone() for k, v in model_avg.items()},
                        "batch_idx_train": i * period + 7, "average_period": period},
                       tmp_path / f"checkpoint-{i * period}.pt")
    assert average_main(["--exp-dir", str(tmp_path), "--iter", "600", "--avg", "2"]) == 0
    out = torch.load(tmp_path / "iter-600-avg-2.pt", weights_only=True)
    assert list(out) == ["model"]
    expect = sum(s["w"] for s in snaps[2:]) / 4  # updates (200, 600]: snapshots 3..6
    assert torch.allclose(out["model"]["w"], expect) and out["model"]["w"].dtype == torch.float32
    sd, _ = average_checkpoints(tmp_path, iteration=400, avg=1)
    assert torch.allclose(sd["b"], torch.tensor([3.5]))
    with pytest.raises(ValueError, match="needs 4 checkpoint-N.pt files"):
        average_checkpoints(tmp_path, iteration=600, avg=3)


def test_config_errors_name_the_key(tmp_path, setup):
    raw = tiny_config(setup, tmp_path / "x")
    raw["train"]["nmu_iters"] = 3
    with pytest.raises(ValueError, match=r"train\.nmu_iters: Extra inputs"):
        load_config(raw=raw)
    raw = tiny_config(setup, tmp_path / "x")
    with pytest.raises(ValueError, match=r"model\.regularisation: .*unknown regularisation key"):
        load_config(raw=raw, overrides=["model.regularisation={dropout: 0.1}"])
    cfg = load_config(raw=tiny_config(setup, tmp_path / "x"),
                      overrides=["train.num_iters=7", "optim.scheduler=eden", "data.max_len=60"])
    assert (cfg.train.num_iters, cfg.optim.scheduler, cfg.data.max_len) == (7, "eden", 60.0)
    for name in ("train_dialog", "train_stereo", "train_monologue", "train_tiny", "train_distill"):
        load_config(REPO / "configs" / f"{name}.yaml")  # every shipped config validates


# --------------------------------------------------------------------------------------------
# Other stages
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stereo_stage_with_two_process_ddp(dialog_runs, setup, tmp_path):
    """torchrun (gloo) with 2 ranks: the stereo model starts from the trained dialog folder,
    alternates mono (even) and stereo (odd) batches with the speaker-exclusive loss (unused
    head parameters under DDP), validates on the stereo path."""
    data = make_corpus(tmp_path / "stereo", 4, seed0=200, stereo=True)
    raw = tiny_config(setup, tmp_path / "exp", stage="stereo",
                      model={"init_checkpoint": str(dialog_runs["A"].exp_dir), "token_file": None,
                             "config": None},
                      train={"num_iters": 2, "save_every_n": 2, "valid_every_n": 2, "export_avg": 0})
    raw["data"].update(train=[{"name": "st", "manifest": str(data), "channels": 2}], dev_size=1,
                       max_duration=4.0 + 3.0)
    cfg = tmp_path / "stereo.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "model.train", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "exp") if "loss" in r]
    assert [r["head"] for r in rows] == ["mono", "stereo"]
    assert rows[0]["se_loss"] == 0.0 and rows[1]["se_loss"] > 0.0
    assert rows[1]["loss"] == pytest.approx(rows[1]["fm_loss"] + rows[1]["se_loss"], rel=1e-5)
    assert any("valid_loss" in r for r in read_metrics(tmp_path / "exp"))
    ckpt = torch.load(tmp_path / "exp" / "checkpoint-2.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["sampler"]["world_size"] == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    loaded = load_model(tmp_path / "exp")
    assert loaded.variant == "zipvoice_dialog_stereo"
    # the mono head started as the dialog model's projection and has been trained since
    dialog = load_state_dict(dialog_runs["A"].exp_dir / "model.pt")
    w = loaded.model.state_dict()["fm_decoder.in_proj.1.weight"]
    assert w.shape == dialog["fm_decoder.in_proj.weight"].shape
    assert not torch.equal(w, dialog["fm_decoder.in_proj.weight"])


def test_monologue_pretraining_with_eden_bf16_and_epoch_checkpoints(setup, tmp_path):
    raw = tiny_config(setup, tmp_path / "exp", stage="monologue",
                      model={"init_checkpoint": None, "token_file": str(setup["mono_tokens"]),
                             "tokenizer": "emilia"},
                      optim={"scheduler": "eden", "lr": 0.02, "warmup_batches": 4},
                      train={"num_iters": 0, "num_epochs": 1, "precision": "bf16", "export_avg": 0,
                             "save_every_n": 100})
    raw["data"].update(max_duration=16.0, dev_size=0)
    res = train(load_config(raw=raw))
    rows = [r for r in read_metrics(tmp_path / "exp") if "loss" in r]
    assert len(rows) >= 2 and all(np.isfinite(r["loss"]) for r in rows)
    for r in rows:  # warm-up 0.5 -> 1 over 4 batches, epoch 0 factor 1
        b = r["step"]
        warm = 0.5 + 0.5 * b / 4 if b < 4 else 1.0
        assert r["lr"] == pytest.approx(0.02 * warm * (1 + (b / 7500) ** 2) ** -0.25)
    assert (tmp_path / "exp" / "epoch-1.pt").is_file()
    assert load_model(tmp_path / "exp").variant == "zipvoice"
    assert res.batch_idx_train == len(rows)


