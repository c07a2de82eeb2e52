"""Pipeline configuration: YAML validated on load.

A config has a ``run`` section (input, output, Ray) and a ``stages`` mapping whose order is the
pipeline order. Each stage section is validated by the stage class's own ``Config`` model, so an
unknown key or a bad value fails with the dotted key path, e.g.
``configs/local.yaml: stages.vad.threshold: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import copy
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


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """``"a.b.c=VALUE"`` -> (["a", "b", "c"], VALUE parsed as YAML: ``3.0``, ``true``, ``null``,
    ``[1, 2]``, ``{name: x}``; anything else stays a string). A numeric part indexes a list."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. stages.vad.threshold=0.4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return [int(p) if p.isdigit() else p for p in key.split(".")], parsed


def apply_overrides(raw: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """A deep copy of ``raw`` with every ``KEY=VALUE`` of ``items`` set (missing sections are
    created). Shared by ``run_pipeline.py --set`` and ``model.train --set``; the result is then
    validated like the file, so a misspelt key fails with its dotted path."""
    raw = copy.deepcopy(raw)
    for item in items or []:
        parts, value = parse_override(item)
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(node, list) and isinstance(part, int):
                if part >= len(node):
                    raise ConfigError(f"--set {item!r}: {where}: index out of range (the list has {len(node)} items)")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {where}: the parent is not a section")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(map(str, parts))}: the parent is not a section")
    return raw


def _resolve_run_paths(raw: dict[str, Any]) -> None:
    """Relative ``run.input`` / ``run.output`` are relative to the current directory (where the
    command runs), whatever folder the config file lives in; made absolute here so that Ray workers
    with another working directory see the same files."""
    run = raw.get("run")
    if not isinstance(run, dict):
        return
    for key in ("input", "output"):
        value = run.get(key)
        if isinstance(value, str) and value:
            run[key] = str(Path(value).expanduser().absolute())


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are merged into the ``run`` section and
    ``sets`` are ``KEY=VALUE`` overrides anywhere (``--set``)."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    source = str(path)
    if isinstance(raw, dict):
        if sets:
            raw = apply_overrides(raw, sets)
            source += " with --set " + " ".join(sets)
        if overrides:
            raw = {**raw, "run": {**(raw.get("run") or {}), **overrides}}
        _resolve_run_paths(raw)
    return parse_config(raw, source, path)
