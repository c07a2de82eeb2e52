"""The generic runner: a config's stages -> one streaming Ray Data pipeline, resumable.

Rows are recordings. Each stage worker writes, per batch, an atomic part file of its manifest
(whose Parquet metadata records the stage fingerprint and the verdict of every recording in the
batch) and a part file of the rows it passes on (the "state" that downstream stages read). A
rerun reads those verdicts first: recordings a stage already finished with the same fingerprint
skip it, and parts written under another fingerprint (a changed config upstream or in the stage)
are deleted, so that stage and everything downstream run again. Part names are derived from the
batch content, so a retried batch overwrites its own part instead of adding a duplicate, and
readers deduplicate by key anyway. At the end of a run the parts are compacted into one sorted
file per stage and the ledger is written.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import manifests, report
from pipeline.config import PipelineConfig, StageSpec
from pipeline.inputs import discover
from pipeline.stage import StageContext, limit_threads

log = logging.getLogger("pipeline")

PART_META_KEY = b"opendialog.part"
STATE_DIR = ".state"
FLOW_SCHEMA = pa.schema(
    [("recording_id", pa.string()), ("source_path", pa.string()), ("resume_from", pa.int32()), ("state", pa.string())]
)


# ----------------------------------------------------------------------------- part files


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in a pipeline row")


def _part_name(fingerprint: str, rids: list[str]) -> str:
    h = hashlib.sha1((fingerprint + "\n" + "\n".join(sorted(rids))).encode()).hexdigest()[:20]
    return f"part-{h}.parquet"


def _stage_dirs(output: Path, stage: str) -> tuple[Path, Path]:
    return output / "manifests" / stage, output / STATE_DIR / stage


def part_meta(path: Path) -> dict | None:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # a damaged part is treated as absent: its recordings run again
        return None
    raw = meta.get(PART_META_KEY)
    return json.loads(raw) if raw else None


@dataclass
class StageOutcomes:
    """Verdicts of one stage read from its part files: rid -> (status, reason)."""

    fingerprint: str
    outcomes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0  # worker time spent on these recordings
    audio_seconds: float = 0.0  # their duration


def load_outcomes(output: Path, spec: StageSpec, prune: bool = True) -> StageOutcomes:
    """Read the verdicts of a stage; delete (or ignore) parts of other fingerprints."""
    mdir, sdir = _stage_dirs(output, spec.name)
    res = StageOutcomes(spec.fingerprint)
    for f in sorted(mdir.glob("*.parquet")):
        meta = part_meta(f)
        if meta is None or meta.get("fingerprint") != spec.fingerprint:
            if prune:
                f.unlink(missing_ok=True)
                (sdir / f.name).unlink(missing_ok=True)
            continue
        res.files.append(f)
        res.seconds += meta.get("seconds", 0.0)
        res.audio_seconds += meta.get("audio_seconds", 0.0)
        for rid, (status, reason) in meta["outcomes"].items():
            res.outcomes[rid] = (status, reason)
    if prune and sdir.exists():
        # State parts without their manifest part were written by a batch that was killed before
        # finishing; they are rewritten when the batch runs again.
        live = {f.name for f in res.files}
        for f in sdir.glob("*.parquet"):
            if f.name not in live:
                f.unlink(missing_ok=True)
    return res


def write_parts(output: Path, spec: StageSpec, rows: list[dict], manifest_rows: list[dict],
                seconds: float = 0.0) -> None:
    """Persist one processed batch: state of the rows passed on, then the manifest part (whose
    existence marks the batch as done). ``seconds``: worker time the batch took, kept with the
    audio duration it covered so that every stage's cost per audio hour can be reported."""
    mdir, sdir = _stage_dirs(output, spec.name)
    rids = [r["recording_id"] for r in rows]
    name = _part_name(spec.fingerprint, rids)
    meta = {
        "fingerprint": spec.fingerprint,
        "stage": spec.name,
        "outcomes": {r["recording_id"]: [r["status"], r.get("reason")] for r in rows},
        "seconds": round(seconds, 4),
        "audio_seconds": round(sum(float(r.get("duration") or 0.0) for r in rows), 4),
    }
    ok = [r for r in rows if r["status"] == "ok"]
    state = pa.table(
        {
            "recording_id": pa.array([r["recording_id"] for r in ok], pa.string()),
            "state": pa.array([json.dumps(r, default=_json_default) for r in ok], pa.string()),
        }
    )
    manifests.write_table(state, sdir / name)
    table = manifests.to_table(
        spec.cls.manifest, manifest_rows, {PART_META_KEY: json.dumps(meta).encode()}
    )
    manifests.write_table(table, mdir / name)


def read_states(output: Path, stage: str, rids: list[str]) -> dict[str, dict]:
    sdir = _stage_dirs(output, stage)[1]
    if not rids or not sdir.exists():
        return {}
    ds = pads.dataset(str(sdir), format="parquet")
    table = ds.to_table(filter=pc.field("recording_id").isin(rids))
    return {rid: json.loads(s) for rid, s in zip(table.column("recording_id").to_pylist(), table.column("state").to_pylist())}


# ----------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class _WorkerSpec:
    spec: StageSpec
    index: int
    upstream: str | None  # name of the previous stage (its state feeds resumed rows)
    output: Path
    last: bool


class StageWorker:
    """Runs one stage inside a Ray worker: loads the stage (its model) once, then handles batches."""

    def __init__(self, w: _WorkerSpec):
        self.w = w
        limit_threads(max(1, int(round(w.spec.resources.num_cpus))))
        ctx = StageContext(w.spec.name, w.output, w.spec.resources.num_cpus, w.spec.resources.num_gpus)
        self.stage = w.spec.cls(w.spec.config, ctx)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = self.w.index
        passing = [r for r in rows if r["resume_from"] > idx]
        todo = [r for r in rows if r["resume_from"] <= idx]
        states = self._states(todo)
        t0 = time.perf_counter()
        results = self._process(states) if states else []
        if results:
            manifest_rows = []
            for r in results:
                manifest_rows += self._manifest_rows(r)
            write_parts(self.w.output, self.w.spec, results, manifest_rows, time.perf_counter() - t0)
        out = passing + [
            {
                "recording_id": r["recording_id"],
                "source_path": r["source_path"],
                "resume_from": idx + 1,
                # The last stage's rows are only counted by the driver: keep them small.
                "state": "" if self.w.last else json.dumps(r, default=_json_default),
            }
            for r in results
            if r["status"] == "ok"
        ]
        return pa.Table.from_pylist(out, schema=FLOW_SCHEMA)

    def _states(self, rows: list[dict]) -> list[dict]:
        need = [r["recording_id"] for r in rows if not r["state"]]
        loaded = read_states(self.w.output, self.w.upstream, need) if need and self.w.upstream else {}
        states = []
        for r in rows:
            rid = r["recording_id"]
            if r["state"]:
                states.append(json.loads(r["state"]))
            elif self.w.upstream is None:
                states.append({"recording_id": rid, "source_path": r["source_path"]})
            elif rid in loaded:
                states.append(loaded[rid])
            else:  # the upstream output vanished (deleted by hand): say so rather than guess
                states.append({"recording_id": rid, "source_path": r["source_path"], "_missing": True})
        return states

    def _process(self, states: list[dict]) -> list[dict]:
        missing = [s for s in states if s.get("_missing")]
        present = [s for s in states if not s.get("_missing")]
        for s in missing:
            del s["_missing"]
            s.update(status="failed", reason=f"resume: no stored output of stage {self.w.upstream!r}")
        results: list[dict] = []
        if present:
            try:
                # Deep copies: a stage that fails half-way must not leave the retry altered rows.
                results = self.stage.process(copy.deepcopy(present))
                if len(results) != len(present):
                    raise RuntimeError(f"stage returned {len(results)} rows for {len(present)}")
            except Exception:
                # Isolate the recording that breaks the batch; the others go on.
                results = [self._process_one(s) for s in present]
        for r in results:
            if r.get("status") not in manifests.STATUSES:
                r["reason"] = f"stage returned invalid status {r.get('status')!r}"
                r["status"] = "failed"
        return results + missing

    def _process_one(self, state: dict) -> dict:
        try:
            return self.stage.process([copy.deepcopy(state)])[0]
        except Exception as e:  # noqa: BLE001 - every error becomes a 'failed' row with its reason
            log.exception("stage %s failed on %s", self.w.spec.name, state["recording_id"])
            return dict(state, status="failed", reason=f"{type(e).__name__}: {e}"[:500])

    def _manifest_rows(self, row: dict) -> list[dict]:
        try:
            return self.stage.manifest_rows(row)
        except Exception as e:  # noqa: BLE001
            row["status"], row["reason"] = "failed", f"manifest rows: {type(e).__name__}: {e}"[:500]
            return []


def _run_task(batch: pa.Table, w: _WorkerSpec) -> pa.Table:
    return StageWorker(w)(batch)


# ----------------------------------------------------------------------------- the driver


@dataclass
class RunResult:
    output: Path
    num_inputs: int
    processed: int
    ledger: pa.Table
    seconds: float


class OutputLocked(RuntimeError):
    pass


def _lock(output: Path):
    output.mkdir(parents=True, exist_ok=True)
    fh = open(output / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        fh.close()
        raise OutputLocked(f"{output}: another pipeline run is writing to this output directory") from e
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def plan(inputs: list[tuple[str, str]], stages: list[StageSpec], done: dict[str, StageOutcomes]) -> list[dict]:
    """The rows to run: each with the index of the first stage it still needs."""
    rows = []
    for src, rid in inputs:
        k = 0
        for spec in stages:
            o = done[spec.name].outcomes.get(rid)
            if o is None:
                break
            if o[0] != "ok":
                k = -1  # left the pipeline at this stage: finished
                break
            k += 1
        if 0 <= k < len(stages):
            rows.append({"recording_id": rid, "source_path": src, "resume_from": k, "state": ""})
    return rows


def _init_ray(cfg: PipelineConfig, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    rc = cfg.run.ray
    address = address or rc.address
    kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    if address:
        # Workers of an existing cluster get this project's code shipped with the job.
        import filters
        import pipeline

        kwargs["runtime_env"] = {"py_modules": [Path(pipeline.__file__).parent, Path(filters.__file__).parent]}
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, object_store_memory=rc.object_store_memory, **kwargs)


def _build(rows: list[dict], cfg: PipelineConfig, output: Path, local: bool):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.run.progress
    ctx.print_on_execution_start = False
    table = pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)
    # Many small blocks so that the first stages start on several workers at once.
    step = max(1, -(-len(rows) // 1000))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(rows), step)])
    n = len(cfg.stages)
    scale, gpu_scale = _cpu_scale(cfg, local), _gpu_scale(cfg, local)
    for i, spec in enumerate(cfg.stages):
        res = spec.resources
        if scale < 1 or (gpu_scale < 1 and res.num_gpus):
            # Round down: a sum of requests just above the total would never be scheduled.
            gpus = math.floor(res.num_gpus * gpu_scale * 1000) / 1000
            res = res.model_copy(update={"num_cpus": math.floor(res.num_cpus * scale * 1000) / 1000,
                                         # Ray takes fractions only below one GPU.
                                         "num_gpus": gpus if gpus <= 1 else float(math.floor(gpus))})
            spec = StageSpec(spec.name, spec.cls, spec.config, res, spec.fingerprint)
        w = _WorkerSpec(spec, i, cfg.stages[i - 1].name if i else None, output, i == n - 1)
        common = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus, zero_copy_batch=False)
        if res.num_gpus:
            common["num_gpus"] = res.num_gpus
        conc = res.concurrency
        if spec.cls.stateful:
            pool = ray.data.ActorPoolStrategy(size=conc) if isinstance(conc, int) else \
                ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1])
            ds = ds.map_batches(StageWorker, fn_constructor_kwargs={"w": w}, compute=pool, **common)
        else:
            size = conc if isinstance(conc, int) else conc[1]
            ds = ds.map_batches(_run_task, fn_kwargs={"w": w}, compute=ray.data.TaskPoolStrategy(size=size), **common)
    return ds


def _cpu_scale(cfg: PipelineConfig, local: bool) -> float:
    """On a local Ray smaller than the pipeline's minimum footprint (every actor pool keeps at least
    one worker alive), shrink the CPU requests so that all stages fit instead of waiting forever;
    the OS then shares the cores. A cluster keeps the requests as written (it may autoscale)."""
    import ray

    if not local:
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1.0))
    need = 0.0
    for spec in cfg.stages:
        r = spec.resources
        workers = r.concurrency if isinstance(r.concurrency, int) else r.concurrency[0]
        need += r.num_cpus * (workers if spec.cls.stateful else 1)
    if need <= total:
        return 1.0
    scale = total / need
    _say(f"local Ray has {total:g} CPUs but the stages need {need:g} at once: CPU requests scaled by {scale:.2f}")
    return scale


def _gpu_scale(cfg: PipelineConfig, local: bool) -> float:
    """The same for GPUs: on a local Ray with fewer GPUs than the GPU stages' minimum workers ask
    for (the paper's layout keeps four GPU pools of >= 1 worker; a workstation has one GPU), each
    GPU worker gets a fraction of a GPU and the stages share it; with no GPU at all they run on
    the CPU. A cluster keeps the requests as written."""
    import ray

    if not local:
        return 1.0
    total = float(ray.cluster_resources().get("GPU", 0.0))
    need = 0.0
    for spec in cfg.stages:
        r = spec.resources
        workers = r.concurrency if isinstance(r.concurrency, int) else r.concurrency[0]
        need += r.num_gpus * (workers if spec.cls.stateful else 1)
    if need <= total:
        return 1.0
    scale = total / need
    if scale == 0:
        _say(f"local Ray has no GPU but the stages ask for {need:g}: GPU stages run on the CPU")
    else:
        gpus = "GPU" if total == 1 else "GPUs"
        _say(f"local Ray has {total:g} {gpus} but the stages need {need:g} at once: GPU requests scaled by "
             f"{scale:.3f}, the GPU stages share the {gpus} (mind their memory: e.g. vllm.gpu_memory_utilization)")
    return scale


def compact(output: Path, spec: StageSpec) -> None:
    """Merge a stage's parts into one sorted, deduplicated file (manifest and state)."""
    mdir, sdir = _stage_dirs(output, spec.name)
    parts = load_outcomes(output, spec, prune=False)
    if len(parts.files) <= 1 and all(f.name == f"{spec.name}.parquet" for f in parts.files):
        return
    name = f"{spec.name}.parquet"
    schema = spec.cls.manifest
    # State first: if we are killed half-way, the manifest parts (the done markers) still exist and
    # their state is found either in the old parts or in the new compacted file.
    state_files = [sdir / f.name for f in parts.files if (sdir / f.name).exists()]
    if state_files:
        st = manifests.dedupe(pa.concat_tables([pq.read_table(f) for f in state_files]), ("recording_id",))
        manifests.write_table(st, sdir / name)
    tables = [manifests.read_manifest_file(schema, f) for f in parts.files]
    table = manifests.dedupe(pa.concat_tables(tables, promote_options="none"), manifests.KEYS[schema])
    meta = {"fingerprint": spec.fingerprint, "stage": spec.name,
            "outcomes": {k: list(v) for k, v in sorted(parts.outcomes.items())},
            "seconds": round(parts.seconds, 4), "audio_seconds": round(parts.audio_seconds, 4)}
    table = table.replace_schema_metadata({**manifests.schema_for(schema).metadata, PART_META_KEY: json.dumps(meta).encode()})
    manifests.write_table(table, mdir / name)
    for f in parts.files:
        if f.name != name:
            f.unlink(missing_ok=True)
            (sdir / f.name).unlink(missing_ok=True)


def build_ledger(output: Path, inputs: list[tuple[str, str]], stages: list[StageSpec],
                 done: dict[str, StageOutcomes]) -> pa.Table:
    durations: dict[str, float] = {}
    first = stages[0]
    if "duration" in manifests.SCHEMAS[first.cls.manifest].names:
        try:
            t = manifests.read_manifest(output, first.name, first.cls.manifest)
            durations = dict(zip(t.column("recording_id").to_pylist(), t.column("duration").to_pylist()))
        except manifests.ManifestError:
            pass
    last = stages[-1]
    kept_segments: Counter = Counter()
    kept_duration: Counter = Counter()
    last_schema = manifests.SCHEMAS[last.cls.manifest]
    if "segment_id" in last_schema.names:
        try:
            t = manifests.read_manifest(output, last.name, last.cls.manifest)
            for rid, status, s, e in zip(*(t.column(c).to_pylist() for c in ("recording_id", "status", "start", "end"))):
                if status == "ok":
                    kept_segments[rid] += 1
                    kept_duration[rid] += e - s
        except manifests.ManifestError:
            pass
    rows = []
    for src, rid in inputs:
        status, stage, reason = "kept", last.name, None
        for spec in stages:
            o = done[spec.name].outcomes.get(rid)
            if o is None:
                status, stage, reason = "pending", spec.name, "not processed yet (interrupted run?)"
                break
            if o[0] != "ok":
                status, stage, reason = o[0], spec.name, o[1]
                break
        rows.append(dict(source_path=src, recording_id=rid, status=status, stage=stage, reason=reason,
                         duration=durations.get(rid), kept_segments=kept_segments.get(rid, 0),
                         kept_duration=round(kept_duration.get(rid, 0.0), 6)))
    return manifests.to_table("ledger", rows)


def run_pipeline(cfg: PipelineConfig, input_spec: str | Path | None = None, output: str | Path | None = None,
                 ray_address: str | None = None) -> RunResult:
    t0 = time.time()
    input_spec = input_spec or cfg.run.input
    if not input_spec:
        raise ValueError("no input: pass --input or set run.input in the config")
    output = Path(output or cfg.run.output).resolve()
    lock = _lock(output)
    try:
        inputs = discover(input_spec)
        (output / "run_config.json").write_text(json.dumps(
            {"config_file": str(cfg.path) if cfg.path else None, "config": cfg.raw,
             "stages": [{"name": s.name, "fingerprint": s.fingerprint} for s in cfg.stages]}, indent=2, default=str))
        for spec in cfg.stages:
            _write_stage_record(output, spec)
        done = {spec.name: load_outcomes(output, spec) for spec in cfg.stages}
        rows = plan(inputs, cfg.stages, done)
        _say(f"{len(inputs)} input files; {len(inputs) - len(rows)} already finished; {len(rows)} to run")
        if rows:
            for i, spec in enumerate(cfg.stages):
                n = sum(r["resume_from"] <= i for r in rows)
                _say(f"  {spec.name:<15} up to {n} recordings  [{spec.cls.__name__}, fingerprint {spec.fingerprint}]")
            _init_ray(cfg, ray_address)
            ds = _build(rows, cfg, output, local=not (ray_address or cfg.run.ray.address))
            finished = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                finished += batch.num_rows
        for spec in cfg.stages:
            compact(output, spec)
        done = {spec.name: load_outcomes(output, spec) for spec in cfg.stages}
        for spec in cfg.stages:
            spec.cls.finalize(spec.config, output)
        ledger = build_ledger(output, inputs, cfg.stages, done)
        manifests.write_table(ledger, output / "ledger.parquet")
        if cfg.run.report.enabled:
            report.write_report(output)
        for spec in cfg.stages:
            o = done[spec.name]
            if o.audio_seconds > 0:
                _say(f"  {spec.name:<15} {o.seconds:8.1f} worker s for {o.audio_seconds / 3600:.3f} audio h "
                     f"(RTF {o.seconds / o.audio_seconds:.4f})")
        counts = Counter(zip(ledger.column("status").to_pylist(), ledger.column("stage").to_pylist()))
        _say("ledger: " + ", ".join(f"{n} {st} at {sg}" for (st, sg), n in sorted(counts.items())))
        return RunResult(output, len(inputs), len(rows), ledger, time.time() - t0)
    finally:
        lock.close()


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
    (mdir / "_stage.json").write_text(json.dumps(record, indent=2))


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


