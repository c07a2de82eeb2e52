"""The run directory: everything the pipeline keeps on disk between and during runs.

``<output>/.lock`` (one writer at a time), the staged part files of each stage under
``.state/<stage>/<fingerprint>/`` (``manifest/`` rows of the stage's manifest, ``state/`` the rows
it passes on), the verdicts they record, and the publication of a finished run's parts as
``manifests/<stage>/<stage>.parquet`` with its ``_stage.json`` record.

Each stage worker writes, per batch, an atomic part file of its manifest (whose Parquet metadata
records the stage fingerprint and, for every recording of the batch, its verdict and the content
key of its source file) and a part file of the rows it passes on (the "state" that downstream
stages read). The published manifest changes only at the end of a run that finished, when the
staged parts are merged into it (rows of the current inputs only: a removed input leaves, a re-run
recording's rows replace its old ones). So a stopped run, or one started with a changed config,
leaves the previous complete outputs as they were, and superseded parts are deleted only after
their replacement is published. Part names are derived from the batch content, so a retried batch
overwrites its own part instead of adding a duplicate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifests
from pipeline.atomic import atomic_write
from pipeline.config import StageSpec

PART_META_KEY = b"opendialog.part"
STATE_DIR = ".state"

# ----------------------------------------------------------------------------- part files


def json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a pipeline row")


def part_name(fingerprint: str, rids: list[str]) -> str:
    h = hashlib.sha1((fingerprint + "\n" + "\n".join(sorted(rids))).encode()).hexdigest()[:20]
    return f"part-{h}.parquet"


def _published(output: Path, stage: str, fingerprint: str) -> tuple[Path, Path]:
    """The published manifest of a stage and the state file that goes with it at ``fingerprint``
    (named by it: while a new generation is being published the old pair stays consistent)."""
    return (output / "manifests" / stage / f"{stage}.parquet",
            output / STATE_DIR / stage / f"{stage}-{fingerprint}.parquet")


def staging_dir(output: Path, stage: str, fingerprint: str) -> Path:
    return output / STATE_DIR / stage / fingerprint


def part_meta(path: Path) -> dict | None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # a damaged part is treated as absent: its recordings run again
        return None
    raw = meta.get(PART_META_KEY)
    return json.loads(raw) if raw else None


@dataclass
class StageOutcomes:
    """Verdicts of one stage at one fingerprint: rid -> (status, reason, content key), read from
    the published manifest (when it has this fingerprint) and the staged parts, the later source
    of a recording winning."""

    fingerprint: str
    outcomes: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)
    # (manifest file, state file) in reading order: the published pair first, then staged parts.
    files: list[tuple[Path, Path]] = field(default_factory=list)
    winner: dict[str, int] = field(default_factory=dict)  # rid -> index in files
    seconds: float = 0.0  # worker time spent on these recordings
    audio_seconds: float = 0.0  # their duration


def load_outcomes(output: Path, spec: StageSpec) -> StageOutcomes:
    """Read the verdicts of a stage at its current fingerprint (nothing is deleted here)."""
    res = StageOutcomes(spec.fingerprint)
    manifest, state = _published(output, spec.name, spec.fingerprint)
    stage_dir = staging_dir(output, spec.name, spec.fingerprint)
    staged = sorted((stage_dir / "manifest").glob("*.parquet"),
                    key=lambda f: (f.stat().st_mtime_ns, f.name)) if (stage_dir / "manifest").exists() else []
    for f, sf in [(manifest, state)] + [(f, stage_dir / "state" / f.name) for f in staged]:
        meta = part_meta(f) if f.exists() else None
        if meta is None or meta.get("fingerprint") != spec.fingerprint:
            continue
        k = len(res.files)
        res.files.append((f, sf))
        res.seconds += meta.get("seconds", 0.0)
        res.audio_seconds += meta.get("audio_seconds", 0.0)
        for rid, o in meta["outcomes"].items():
            # Parts written before content keys existed carry none: they never match an input.
            res.outcomes[rid] = (o[0], o[1], o[2] if len(o) > 2 else None)
            res.winner[rid] = k
    return res


def write_parts(output: Path, spec: StageSpec, rows: list[dict], manifest_rows: list[dict],
                seconds: float = 0.0, keys: dict[str, str] | None = None,
                encoded: dict[str, str] | None = None) -> str:
    """Persist one processed batch in the staging folder: state of the rows passed on, then the
    manifest part (whose existence marks the batch as done). ``seconds``: worker time the batch
    took, kept with the audio duration it covered so that every stage's cost per audio hour can
    be reported. ``keys``: content key of each recording's source file. ``encoded``: the JSON of
    rows the caller already encoded (the worker passes the same text on to the next stage).
    Returns the part name."""
    stage_dir = staging_dir(output, spec.name, spec.fingerprint)
    keys = keys or {}
    rids = [r["recording_id"] for r in rows]
    name = part_name(spec.fingerprint, rids)
    meta = {
        "fingerprint": spec.fingerprint,
        "stage": spec.name,
        "outcomes": {r["recording_id"]: [r["status"], r.get("reason"), keys.get(r["recording_id"])] for r in rows},
        "seconds": round(seconds, 4),
        "audio_seconds": round(sum(float(r.get("duration") or 0.0) for r in rows), 4),
    }
    ok = [r for r in rows if r["status"] == "ok"]
    state = pa.table(
        {
            "recording_id": pa.array([r["recording_id"] for r in ok], pa.string()),
            "state": pa.array([(encoded or {}).get(r["recording_id"]) or json.dumps(r, default=json_default)
                               for r in ok], pa.string()),
        }
    )
    manifests.write_table(state, stage_dir / "state" / name)
    table = manifests.to_table(
        spec.cls.manifest, manifest_rows, {PART_META_KEY: json.dumps(meta).encode()}
    )
    manifests.write_table(table, stage_dir / "manifest" / name)
    return name


def read_states(output: Path, spec: StageSpec, rids: list[str], done: StageOutcomes | None = None) -> dict[str, dict]:
    """The stored rows of ``rids`` that ``spec`` passed on, each from the source holding its
    current verdict."""
    if not rids:
        return {}
    done = done or load_outcomes(output, spec)
    by_file: dict[int, list[str]] = {}
    for rid in rids:
        if rid in done.winner:
            by_file.setdefault(done.winner[rid], []).append(rid)
    out: dict[str, dict] = {}
    for k, want in by_file.items():
        state_file = done.files[k][1]
        if not state_file.exists():
            continue
        table = pq.read_table(state_file, filters=[("recording_id", "in", want)])
        for rid, st in zip(table.column("recording_id").to_pylist(), table.column("state").to_pylist()):
            out[rid] = json.loads(st)
    return out


class OutputLocked(RuntimeError):
    pass


class OutputError(ValueError):
    """The output folder cannot be used or written (a file given as the folder, disk full)."""


def lock_output(output: Path):
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: the output must be a folder, and this is a file")
    output.mkdir(parents=True, exist_ok=True)
    # Opened without truncation: a run that loses the race must not erase the winner's pid.
    fh = os.fdopen(os.open(output / ".lock", os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = fh.read().strip()
        fh.close()
        raise OutputLocked(f"{output}: another pipeline run{f' (pid {holder})' if holder else ''} "
                           "is writing to this output directory") from e
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def forget_crashes(output: Path, stages: list[StageSpec], rows: list[dict]) -> None:
    """Rows retried on purpose start with no crash record and no stored single-row verdict."""
    for r in rows:
        spec = stages[r["resume_from"]]
        stage_dir = staging_dir(output, spec.name, spec.fingerprint)
        (stage_dir / "crashes" / r["recording_id"]).unlink(missing_ok=True)
        name = part_name(spec.fingerprint, [r["recording_id"]])
        for sub in ("manifest", "state"):
            (stage_dir / sub / name).unlink(missing_ok=True)


def publish(output: Path, spec: StageSpec, current: dict[str, str]) -> None:
    """Make the current fingerprint's results the stage's published manifest and state: for every
    recording of ``current`` (rid -> content key) the rows of its newest verdict for that content;
    then delete what they supersede (other generations, staged parts, removed inputs' rows)."""
    done = load_outcomes(output, spec)
    manifest, state = _published(output, spec.name, spec.fingerprint)
    keep = {rid: k for rid, k in done.winner.items()
            if rid in current and done.outcomes[rid][2] == current[rid]}
    unchanged = len(done.files) == 1 and done.files[0][0] == manifest and len(keep) == len(done.winner)
    if not unchanged:
        schema = spec.cls.manifest
        tables, states, seconds, audio_seconds = [], [], 0.0, 0.0
        for k, (mf, sf) in enumerate(done.files):
            rids = [rid for rid, kk in keep.items() if kk == k]
            if not rids:
                continue
            meta = part_meta(mf) or {}
            seconds += meta.get("seconds", 0.0)
            audio_seconds += meta.get("audio_seconds", 0.0)
            t = manifests.read_manifest_file(schema, mf)
            tables.append(t.filter(pc.field("recording_id").isin(rids)))
            if sf.exists():
                st = pq.read_table(sf)
                states.append(st.filter(pc.field("recording_id").isin(rids)).select(["recording_id", "state"]))
        fp_meta = {PART_META_KEY: json.dumps({"fingerprint": spec.fingerprint, "stage": spec.name}).encode()}
        st = pa.concat_tables(states) if states else pa.table(
            {"recording_id": pa.array([], pa.string()), "state": pa.array([], pa.string())})
        # State first: if we are killed before the manifest, the old manifest still pairs with its
        # own state file (named by its fingerprint) and the staged parts are still there.
        manifests.write_table(manifests.dedupe(st, ("recording_id",)).replace_schema_metadata(fp_meta), state)
        table = pa.concat_tables([t.select(manifests.SCHEMAS[schema].names) for t in tables]) if tables \
            else manifests.to_table(schema, [])
        table = manifests.dedupe(table, manifests.KEYS[schema])
        meta = {"fingerprint": spec.fingerprint, "stage": spec.name,
                "outcomes": {rid: list(done.outcomes[rid]) for rid in sorted(keep)},
                "seconds": round(seconds, 4), "audio_seconds": round(audio_seconds, 4)}
        table = table.replace_schema_metadata({**manifests.schema_for(schema).metadata, PART_META_KEY: json.dumps(meta).encode()})
        manifests.write_table(table, manifest)
    _write_stage_record(output, spec)
    # Only now is anything superseded deleted: staged generations, old state files, and parts
    # left by versions of this program that kept them next to the manifest.
    sroot = output / STATE_DIR / spec.name
    for p in list(sroot.glob("*")) if sroot.exists() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p != state:
            p.unlink(missing_ok=True)
    for p in manifest.parent.glob("*.parquet"):
        if p != manifest:
            p.unlink(missing_ok=True)


def _write_stage_record(output: Path, spec: StageSpec) -> None:
    """Record which config produced a stage's outputs (next to them)."""
    mdir = output / "manifests" / spec.name
    mdir.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": spec.name,
        "class": f"{spec.cls.__module__}.{spec.cls.__qualname__}",
        "version": spec.cls.version,
        "fingerprint": spec.fingerprint,
        "config": spec.config.model_dump(mode="json"),
        "resources": spec.resources.model_dump(mode="json"),
    }
    atomic_write(mdir / "_stage.json", json.dumps(record, indent=2))

