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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.stage import LANGUAGE_CODE, ROW_START, Resources, Stage, StageConfig
from pipeline.stages import resolve_stage

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


class ConfigError(ValueError):
    pass


MODEL_FILES_HASHED = 200  # files of a model folder whose identity enters the fingerprint
# Keys that name folders the pipeline writes or fills (not model inputs).
NOT_MODEL_KEYS = ("cache_dir", "dir")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML would keep the last
    silently, so a typo'd copy of a section would override the intended one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                              f"(first given at line {seen[key]})")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


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


def _strings(obj: Any, key: str = ""):
    """(dotted key, value) of every string in a config dump."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{key}.{i}")
    elif isinstance(obj, str):
        yield key, obj


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".pt", ".bin", ".safetensors", ".onnx"))


def _file_identity(path: Path) -> list:
    """Size, mtime and a hash of the head and tail: a model file replaced at the same path
    changes the fingerprint of the stages that use it."""
    from pipeline.inputs import content_key

    st = path.stat()
    try:
        return [st.st_size, st.st_mtime_ns, content_key(path)]
    except OSError:
        return [st.st_size, st.st_mtime_ns]


def _model_files(config: dict) -> dict[str, list]:
    """Identity of every local file or folder a stage config names (model weights, token files)."""
    out: dict[str, list] = {}
    for key, value in _strings(config):
        if key.rsplit(".", 1)[-1] in NOT_MODEL_KEYS:
            continue
        if "/" not in value and not _looks_like_path(value):
            continue  # a plain word ("en", "silero") or a hub id is no local file
        p = Path(os.path.expanduser(value))
        try:
            if p.is_file():
                out[key] = _file_identity(p)
            elif p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file())[:MODEL_FILES_HASHED]
                out[key] = [[str(f.relative_to(p)), *_file_identity(f)] for f in files]
        except OSError:
            continue
    return out


def _fingerprint(name: str, cls: type[Stage], config: StageConfig, upstream: str) -> str:
    # Resources change how fast a stage runs, not what it writes: they stay out of the hash.
    dump = config.model_dump(mode="json", exclude={"resources", "uses"})
    payload = {
        "name": name,
        "stage": f"{cls.__module__}.{cls.__qualname__}",
        "version": cls.version,
        "config": dump,
        "upstream": upstream,
    }
    files = _model_files(dump)
    if files:  # only then: fingerprints of configs without local model files stay as they were
        payload["files"] = files
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_values(name: str, dump: dict) -> list[str]:
    """Values that become file names must not leave their folder."""
    errors = []
    for key, value in _strings(dump):
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
        if leaf in ("language",) or parent == "languages":
            if not LANGUAGE_CODE.match(value):
                errors.append(f"stages.{name}.{key}: {value!r} is not a language code (e.g. 'en', 'zh', 'en-US')")
    return errors


def check_model_paths(cfg: "PipelineConfig") -> None:
    """Fail before any work when a config names a local model path that does not exist."""
    errors = []
    for spec in cfg.stages:
        for key, value in _strings(spec.config.model_dump(mode="json", exclude={"resources", "uses"})):
            if key.rsplit(".", 1)[-1] in NOT_MODEL_KEYS:
                continue
            if value.startswith(("/", "./", "../", "~")) and not Path(os.path.expanduser(value)).exists():
                errors.append(f"stages.{spec.name}.{key}: {value} does not exist")
    if errors:
        where = cfg.path or "<config>"
        raise ConfigError(f"{where}: missing model files:\n  " + "\n  ".join(errors))


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
        value_errors = _check_values(name, cfg.model_dump(mode="json", exclude={"resources", "uses"}))
        if value_errors:
            errors += value_errors
            continue
        resources = cls.default_resources.model_copy(
            update=cfg.resources.model_dump(exclude_unset=True) if cfg.resources else {}
        )
        upstream = _fingerprint(name, cls, cfg, upstream)
        specs.append(StageSpec(name, cls, cfg, resources, upstream))
    if not errors:
        errors += _check_order(specs)
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))
    return PipelineConfig(path, run, specs, raw)


def _check_order(specs: list[StageSpec]) -> list[str]:
    """Every row column a stage needs must be added by a stage before it: a column that a later
    stage adds means the stages are in the wrong order. (A column no stage of the config adds is
    left to the stage: configs that test one stage name only that one.)"""
    first: dict[str, str] = {}
    for spec in specs:
        for col in spec.cls.adds:
            first.setdefault(col, spec.name)
    have = set(ROW_START)
    errors = []
    for spec in specs:
        for col in spec.cls.row_needs(spec.config):
            if col not in have and col in first:
                errors.append(f"stages.{spec.name}: needs {col!r}, which stage {first[col]!r} adds after it: "
                              f"put {first[col]} before {spec.name}")
        have.update(spec.cls.adds)
    return errors


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
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
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
