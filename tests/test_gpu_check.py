"""The runner's GPU sharing rule for the paper's stage layout (configs/opendialog.yaml: four GPU
stages of >= 1 worker each). The GPU check's dry run is not tested yet: see the README's known gap."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
