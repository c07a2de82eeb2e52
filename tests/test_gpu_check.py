"""The GPU readiness check in its dry run (the same code on CPU at tiny sizes), which also runs the
paper's stage layout (configs/opendialog.yaml: four GPU stages of >= 1 worker each) on a Ray with
ONE logical GPU, and the runner's GPU sharing rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in its own process: it starts its own Ray with one logical GPU."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert (out / "gpu_check.json").exists(), log[-4000:]
    return proc.returncode, json.loads((out / "gpu_check.json").read_text()), proc.stdout, log


def test_dry_run_measures_every_figure(dry_run):
    rc, result, stdout, log = dry_run
    assert rc == 0, log[-4000:]
    figures, missing = result["figures"], result["not_measured"]
    # Only the optional sections may be missing, each with its reason; here vLLM is not installed.
    assert set(missing) <= gpu_check.OPTIONAL, missing
    assert missing["llm_vllm"].startswith("vLLM is not installed")
    for section, keys in gpu_check.FIGURES.items():
        if section in missing:
            assert not any(k.startswith(section + ".") for k in figures)
            continue
        for k in keys:
            name = f"{section}.{k}"
            assert name in figures, name
            assert math.isfinite(figures[name]) and figures[name] >= 0, (name, figures[name])
            assert name in stdout  # the printed table has it too
    for section in ("diarization", "asr", "whisperd", "llm", "dnsmos", "zipvoice", "train"):
        assert figures[f"{section}.audio_h_per_gpu_h" if section not in ("zipvoice",) else "zipvoice.rtf_16_bf16"] > 0
    # audio hours per device hour is the inverse of the real-time factor
    assert figures["asr.audio_h_per_gpu_h"] == pytest.approx(1 / figures["asr.rtf"], rel=1e-6)
    rates = [figures[f"{s}.audio_h_per_gpu_h"] for s in ("diarization", "asr", "llm", "whisperd")]
    assert figures["recipe.audio_h_per_gpu_h"] == pytest.approx(1 / sum(1 / r for r in rates), rel=1e-6)
    assert result["environment"]["device"] == "cpu" and result["dry_run"] is True


def test_paper_layout_runs_on_one_gpu(dry_run):
    """Four GPU stages, each with at least one worker, on a Ray that has ONE (logical) GPU: the
    runner gives each GPU worker a quarter of it, says so, and every generated dialogue goes
    through all nine stages. The stages ran their models on the CPU (the GPU is only logical)."""
    rc, result, stdout, log = dry_run
    figures = result["figures"]
    assert "local Ray has 1 GPU but the stages need 4 at once: GPU requests scaled by 0.250" in log
    # the four quarter-GPU pools were placed at once (their minimum workers live for the whole run)
    assert figures["pipeline.gpu_stages"] == 4 and figures["pipeline.gpu_in_use_peak"] == pytest.approx(1.0)
    assert figures["pipeline.kept_segments"] >= gpu_check.DRY.e2e_files
    for stage in ("diarization", "asr", "classification", "segments"):
        assert figures[f"pipeline.{stage}.rtf"] > 0


def test_gpu_scale_rule(ray_local, tmp_path):
    """Cluster requests stay as written; a local Ray with no GPU runs the GPU stages on the CPU."""
    import yaml

    from pipeline.config import parse_config
    from pipeline.dataflow import gpu_scale

    raw = yaml.safe_load((ROOT / "configs" / "opendialog.yaml").read_text())
    raw["run"] = {"output": str(tmp_path)}
    raw["stages"]["classification"]["backend"] = "heuristic"
    cfg = parse_config(raw)
    assert sum(s.resources.num_gpus for s in cfg.stages) == 4
    assert gpu_scale(cfg, local=False) == 1.0
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert gpu_scale(cfg, local=True) == 0.0
    cpu_only = parse_config({"run": {"output": str(tmp_path)}, "stages": {"ingest": {}, "vad": {}}})
    assert gpu_scale(cpu_only, local=True) == 1.0
