"""Pipeline configuration: YAML validated on load.

A config has a ``run`` section (input, output, Ray) and a ``stages`` mapping whose order is the
pipeline order. Each stage section is validated by the stage class's own ``Config`` model, so an
unknown key or a bad value fails with the dotted key path, e.g.
``configs/local.yaml: stages.vad.threshold: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.stage import Resources, Stage, StageConfig
from pipeline.stages import resolve_stage

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


class ConfigError(ValueError):
    pass


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="existing cluster ('auto', 'ray://host:10001'); null starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (null = all)")
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: int | None = Field(None, ge=78643200)


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="directory (walked recursively) or a text file listing paths")
    output: str = "out/run"
    ray: RayConfig = RayConfig()
    progress: bool = True
    report: ReportConfig = ReportConfig()


@dataclass(frozen=True)
class StageSpec:
    """A validated stage section: what the runner needs to build and fingerprint the stage."""

    name: str
    cls: type[Stage]
    config: StageConfig
    resources: Resources
    fingerprint: str


@dataclass(frozen=True)
class PipelineConfig:
    path: Path | None
    run: RunConfig
    stages: list[StageSpec]
    raw: dict[str, Any]


def _format_errors(prefix: str, err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return lines


def _fingerprint(name: str, cls: type[Stage], config: StageConfig, upstream: str) -> str:
    # Resources change how fast a stage runs, not what it writes: they stay out of the hash.
    payload = {
        "name": name,
        "stage": f"{cls.__module__}.{cls.__qualname__}",
        "version": cls.version,
        "config": config.model_dump(mode="json", exclude={"resources", "uses"}),
        "upstream": upstream,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(raw: dict[str, Any], source: str = "<config>", path: Path | None = None) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping with 'run' and 'stages'")
    errors: list[str] = []
    unknown = set(raw) - {"run", "stages"}
    errors += [f"{k}: unknown key (expected 'run' and 'stages')" for k in sorted(unknown)]
    try:
        run = RunConfig.model_validate(raw.get("run") or {})
    except ValidationError as e:
        errors += _format_errors("run", e)
        run = RunConfig()
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        errors.append("stages: must be a non-empty mapping of stage name -> settings")
        stages_raw = {}
    specs: list[StageSpec] = []
    upstream = ""
    for name, section in stages_raw.items():
        section = section or {}
        if not isinstance(section, dict):
            errors.append(f"stages.{name}: must be a mapping")
            continue
        kind = section.get("uses") or name
        try:
            cls = resolve_stage(kind)
        except KeyError as e:
            errors.append(f"stages.{name}: {e.args[0]}")
            continue
        try:
            cfg = cls.Config.model_validate(section)
        except ValidationError as e:
            errors += _format_errors(f"stages.{name}", e)
            continue
        resources = cls.default_resources.model_copy(
            update=cfg.resources.model_dump(exclude_unset=True) if cfg.resources else {}
        )
        upstream = _fingerprint(name, cls, cfg, upstream)
        specs.append(StageSpec(name, cls, cfg, resources, upstream))
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))
    return PipelineConfig(path, run, specs, raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are merged into the ``run`` section."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if overrides and isinstance(raw, dict):
        raw = {**raw, "run": {**(raw.get("run") or {}), **overrides}}
    return parse_config(raw, str(path), path)
