"""The generic runner: a config's stages -> one streaming Ray Data pipeline, resumable.

Rows are recordings. Each stage worker writes, per batch, an atomic part file of its manifest
(whose Parquet metadata records the stage fingerprint and, for every recording of the batch, its
verdict and the content key of its source file) and a part file of the rows it passes on (the
"state" that downstream stages read). Parts are staged under ``.state/<stage>/<fingerprint>/``;
the published manifest ``manifests/<stage>/<stage>.parquet`` changes only at the end of a run that
finished, when the staged parts are merged into it (rows of the current inputs only: a removed
input leaves, a re-run recording's rows replace its old ones). So a stopped run, or one started
with a changed config, leaves the previous complete outputs as they were, and superseded parts are
deleted only after their replacement is published. A rerun reads the verdicts first: recordings a
stage already finished with the same fingerprint and the same content key skip it; a changed
config or a changed file runs again from the stage concerned. Part names are derived from the
batch content, so a retried batch overwrites its own part instead of adding a duplicate.

A worker process that dies (a decoder abort, an OOM kill) is retried a bounded number of times.
Per-recording crash counters in the staging folder make this converge: after a crash the batch is
re-run one recording at a time, each finished recording is stored at once, and a recording that
took its worker down ``MAX_CRASHES`` times is recorded as ``failed`` ("worker crashed 2 times in
stage X") while the rest of its batch goes on.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import json
import math
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
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
from pipeline.config import PipelineConfig, StageSpec, check_model_paths
from pipeline.inputs import Input, expand_inputs
from pipeline.progress import Progress
from pipeline.stage import StageContext, limit_threads

log = logging.getLogger("pipeline")

PART_META_KEY = b"opendialog.part"
STATE_DIR = ".state"
FLOW_SCHEMA = pa.schema(
    [("recording_id", pa.string()), ("source_path", pa.string()), ("content_key", pa.string()),
     ("resume_from", pa.int32()), ("state", pa.string())]
)
MAX_CRASHES = 2  # worker deaths on one recording (one of them alone) before it is recorded as failed


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


def _published(output: Path, stage: str, fingerprint: str) -> tuple[Path, Path]:
    """The published manifest of a stage and the state file that goes with it at ``fingerprint``
    (named by it: while a new generation is being published the old pair stays consistent)."""
    return (output / "manifests" / stage / f"{stage}.parquet",
            output / STATE_DIR / stage / f"{stage}-{fingerprint}.parquet")


def _staging(output: Path, stage: str, fingerprint: str) -> Path:
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
    stage_dir = _staging(output, spec.name, spec.fingerprint)
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
                seconds: float = 0.0, keys: dict[str, str] | None = None) -> str:
    """Persist one processed batch in the staging folder: state of the rows passed on, then the
    manifest part (whose existence marks the batch as done). ``seconds``: worker time the batch
    took, kept with the audio duration it covered so that every stage's cost per audio hour can
    be reported. ``keys``: content key of each recording's source file. Returns the part name."""
    stage_dir = _staging(output, spec.name, spec.fingerprint)
    keys = keys or {}
    rids = [r["recording_id"] for r in rows]
    name = _part_name(spec.fingerprint, rids)
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
            "state": pa.array([json.dumps(r, default=_json_default) for r in ok], pa.string()),
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


# ----------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class _WorkerSpec:
    spec: StageSpec
    index: int
    upstream: StageSpec | None  # the previous stage (its state feeds resumed rows)
    output: Path
    last: bool


class StageWorker:
    """Runs one stage inside a Ray worker: loads the stage (its model) once, then handles batches."""

    def __init__(self, w: _WorkerSpec):
        self.w = w
        limit_threads(max(1, int(round(w.spec.resources.num_cpus))))
        ctx = StageContext(w.spec.name, w.output, w.spec.resources.num_cpus, w.spec.resources.num_gpus)
        self.stage = w.spec.cls(w.spec.config, ctx)
        self._upstream_done: StageOutcomes | None = None
        self.crash_dir = _staging(w.output, w.spec.name, w.spec.fingerprint) / "crashes"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = self.w.index
        passing = [r for r in rows if r["resume_from"] > idx]
        todo = [r for r in rows if r["resume_from"] <= idx]
        keys = {r["recording_id"]: r["content_key"] for r in todo}
        states = self._states(todo)
        results = self._process(states, keys) if states else []
        out = passing + [
            {
                "recording_id": r["recording_id"],
                "source_path": r["source_path"],
                "content_key": keys[r["recording_id"]],
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
        loaded: dict[str, dict] = {}
        if need and self.w.upstream is not None:
            if self._upstream_done is None:  # resumed rows were finished upstream before this run
                self._upstream_done = load_outcomes(self.w.output, self.w.upstream)
            loaded = read_states(self.w.output, self.w.upstream, need, self._upstream_done)
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

    # -- crash accounting: small marker files count the attempts that did not return

    def _crashes(self, name: str) -> int:
        try:
            return int((self.crash_dir / name).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _set_crashes(self, name: str, n: int) -> None:
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.crash_dir / f".{name}.tmp"
        tmp.write_text(str(n))
        tmp.replace(self.crash_dir / name)

    def _clear_crashes(self, name: str) -> None:
        (self.crash_dir / name).unlink(missing_ok=True)

    def _process(self, states: list[dict], keys: dict[str, str]) -> list[dict]:
        missing = [s for s in states if s.get("_missing")]
        present = [s for s in states if not s.get("_missing")]
        for s in missing:
            del s["_missing"]
            s.update(status="failed", reason=f"resume: no stored output of stage {self.w.upstream.name!r}")
        # One marker per batch while it runs (Ray retries a task with the same rows): found on
        # entry, it means a worker died on this batch before.
        batch = _part_name(self.w.spec.fingerprint, [s["recording_id"] for s in present]).replace(".parquet", "")
        if present and self._crashes(batch):
            # One recording at a time, each stored at once, so that the next death names its row.
            results = [self._guarded_one(s, keys) for s in present]
            if missing:
                self._write(missing, keys, 0.0)
            self._clear_crashes(batch)
            return results + missing
        if present:
            self._set_crashes(batch, 1)
        t0 = time.perf_counter()
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
        self._write(results + missing, keys, time.perf_counter() - t0)
        self._clear_crashes(batch)
        return results + missing

    def _guarded_one(self, state: dict, keys: dict[str, str]) -> dict:
        rid = state["recording_id"]
        name = _part_name(self.w.spec.fingerprint, [rid])
        stage_dir = _staging(self.w.output, self.w.spec.name, self.w.spec.fingerprint)
        meta = part_meta(stage_dir / "manifest" / name) if (stage_dir / "manifest" / name).exists() else None
        if meta is not None and rid in meta["outcomes"] and meta["outcomes"][rid][2:3] == [keys.get(rid)]:
            status, reason = meta["outcomes"][rid][:2]
            if status != "ok":
                return dict(state, status=status, reason=reason)
            table = pq.read_table(stage_dir / "state" / name)
            if table.num_rows:  # stored before the last crash: not run again
                return json.loads(table.column("state")[0].as_py())
        n = self._crashes(rid) or 1  # the death of the whole batch counts for each of its rows
        t0 = time.perf_counter()
        if n >= MAX_CRASHES:
            log.error("stage %s: %s took its worker down %d times; recorded as failed", self.w.spec.name, rid, n)
            result = dict(state, status="failed", reason=f"worker crashed {n} times in stage {self.w.spec.name}")
        else:
            self._set_crashes(rid, n + 1)
            result = self._process_one(state)
        self._write([result], keys, time.perf_counter() - t0)
        self._clear_crashes(rid)
        return result

    def _write(self, results: list[dict], keys: dict[str, str], seconds: float) -> None:
        for r in results:
            if r.get("status") not in manifests.STATUSES:
                r["reason"] = f"stage returned invalid status {r.get('status')!r}"
                r["status"] = "failed"
        manifest_rows: list[dict] = []
        for r in results:
            manifest_rows += self._manifest_rows(r)
        write_parts(self.w.output, self.w.spec, results, manifest_rows, seconds, keys)

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


class OutputError(ValueError):
    """The output folder cannot be used or written (a file given as the folder, disk full)."""


def _lock(output: Path):
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


def plan(inputs: list[Input], stages: list[StageSpec], done: dict[str, StageOutcomes],
         retry_failed: bool = False) -> list[dict]:
    """The rows to run: each with the index of the first stage it still needs. A verdict counts
    only when it was given to the same content; ``retry_failed`` runs ``failed`` ones again."""
    rows = []
    for inp in inputs:
        if inp.verdict is not None:
            continue  # settled by discovery (hidden, unreadable, broken link)
        k = 0
        for spec in stages:
            o = done[spec.name].outcomes.get(inp.recording_id)
            if o is None or o[2] != inp.content_key:
                break
            if o[0] != "ok":
                if not (retry_failed and o[0] == "failed"):
                    k = -1  # left the pipeline at this stage: finished
                break
            k += 1
        if 0 <= k < len(stages):
            rows.append({"recording_id": inp.recording_id, "source_path": inp.source_path,
                         "content_key": inp.content_key, "resume_from": k, "state": ""})
    return rows


def _forget_crashes(output: Path, stages: list[StageSpec], rows: list[dict]) -> None:
    """Rows retried on purpose start with no crash record and no stored single-row verdict."""
    for r in rows:
        spec = stages[r["resume_from"]]
        stage_dir = _staging(output, spec.name, spec.fingerprint)
        (stage_dir / "crashes" / r["recording_id"]).unlink(missing_ok=True)
        name = _part_name(spec.fingerprint, [r["recording_id"]])
        for sub in ("manifest", "state"):
            (stage_dir / sub / name).unlink(missing_ok=True)


def _init_ray(cfg: PipelineConfig, address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    rc = cfg.run.ray
    address = address or rc.address
    kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, **_ray_log_options(verbose))
    if address:
        # Workers of an existing cluster get this project's code shipped with the job.
        import filters
        import pipeline

        kwargs["runtime_env"] = {"py_modules": [Path(pipeline.__file__).parent, Path(filters.__file__).parent]}
    else:
        kwargs.update(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, object_store_memory=rc.object_store_memory)
    with contextlib.nullcontext() if verbose else _drop_stderr_lines(b"Set ray log level from environment"):
        ray.init(address=address, **kwargs)


def _ray_log_options(verbose: bool) -> dict[str, Any]:
    """Ray's console output is for Ray developers: worker stdout/stderr, INFO lines and C++
    warnings of Ray itself stay in Ray's log folder (/tmp/ray/session_latest/logs) unless
    --verbose. Failures of our stages still reach the ledger with their reason."""
    if verbose:
        return dict(log_to_driver=True, logging_level=logging.INFO)
    # Ray's C++ side logs its own ERRORs that no user can act on to the driver's stderr, e.g.
    # "core_worker.cc: Actor ... has constructor arguments in the object store and max_restarts > 0"
    # for every Ray Data actor pool (ray-project/ray#53727). It announces the level once.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    return dict(log_to_driver=False, logging_level=logging.ERROR)


@contextlib.contextmanager
def _drop_stderr_lines(*needles: bytes):
    """Capture file descriptor 2 (C++ code writes there directly), then write back every line
    that contains none of ``needles``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().splitlines(keepends=True) if not any(n in ln for n in needles)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs through its own console handler (not the root logger): raise its level."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, which we then adjust

    if verbose:
        return
    for h in logging.getLogger("ray.data").handlers:
        if getattr(h, "name", None) == "console":
            h.setLevel(logging.ERROR)
    # e.g. "The maximum number of concurrent tasks for 'MapBatches(_run_task)' is set to 2, but ...".
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")


def _build(rows: list[dict], cfg: PipelineConfig, output: Path, local: bool, verbose: bool = False):
    import ray

    _quiet_ray_data(verbose)
    ctx = ray.data.DataContext.get_current()
    # Ray Data's own bars name operators, not stages (our Progress does): only with --verbose.
    ctx.enable_progress_bars = verbose
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
        w = _WorkerSpec(spec, i, cfg.stages[i - 1] if i else None, output, i == n - 1)
        common = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus, zero_copy_batch=False)
        # Bounded retries of dead workers (Ray Data's default is to retry forever): enough for the
        # crash counters to isolate every recording of a batch (see StageWorker._process).
        retries = 2 + (MAX_CRASHES - 1) * res.batch_size
        if res.num_gpus:
            common["num_gpus"] = res.num_gpus
        conc = res.concurrency
        if spec.cls.stateful:
            pool = ray.data.ActorPoolStrategy(size=conc) if isinstance(conc, int) else \
                ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1])
            with _retry_args_allowed():
                ds = ds.map_batches(StageWorker, fn_constructor_kwargs={"w": w}, compute=pool,
                                    max_restarts=retries, max_task_retries=retries, **common)
        else:
            size = conc if isinstance(conc, int) else conc[1]
            with _retry_args_allowed():
                ds = ds.map_batches(_run_task, fn_kwargs={"w": w}, compute=ray.data.TaskPoolStrategy(size=size),
                                    max_retries=retries, retry_exceptions=False, **common)
    return ds


@contextlib.contextmanager
def _retry_args_allowed():
    """Ray 2.60 has no named parameter for retry bounds yet and warns about the generic ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
        yield


def _footprint(cfg: PipelineConfig, resource: str) -> float:
    """How much of a resource the stages hold at once at their minimum worker counts (an actor pool
    keeps its minimum alive; a task stage holds one request at a time)."""
    need = 0.0
    for spec in cfg.stages:
        r = spec.resources
        workers = r.concurrency if isinstance(r.concurrency, int) else r.concurrency[0]
        need += getattr(r, resource) * (workers if spec.cls.stateful else 1)
    return need


def _cpu_scale(cfg: PipelineConfig, local: bool) -> float:
    """On a local Ray smaller than the pipeline's minimum footprint (every actor pool keeps at least
    one worker alive), shrink the CPU requests so that all stages fit instead of waiting forever;
    the OS then shares the cores. A cluster keeps the requests as written (it may autoscale)."""
    import ray

    if not local:
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1.0))
    need = _footprint(cfg, "num_cpus")
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
    need = _footprint(cfg, "num_gpus")
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


def build_ledger(output: Path, inputs: list[Input], stages: list[StageSpec],
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
    for src, rid, key, verdict in inputs:
        if verdict is not None:
            rows.append(dict(source_path=src, recording_id=rid, status=verdict[0], stage="discover",
                             reason=verdict[1], duration=None, kept_segments=0, kept_duration=0.0))
            continue
        status, stage, reason = "kept", last.name, None
        for spec in stages:
            o = done[spec.name].outcomes.get(rid)
            if o is None or o[2] != key:
                status, stage, reason = "pending", spec.name, "not processed yet (interrupted run?)"
                break
            if o[0] != "ok":
                status, stage, reason = o[0], spec.name, o[1]
                break
        rows.append(dict(source_path=src, recording_id=rid, status=status, stage=stage, reason=reason,
                         duration=durations.get(rid), kept_segments=kept_segments.get(rid, 0),
                         kept_duration=round(kept_duration.get(rid, 0.0), 6)))
    return manifests.to_table("ledger", rows)


def run_pipeline(cfg: PipelineConfig, input_spec: str | Path | list[str | Path] | None = None,
                 output: str | Path | None = None, ray_address: str | None = None, *,
                 verbose: bool = False, retry_failed: bool = False) -> RunResult:
    """Run (or resume) the pipeline on the inputs. ``input_spec``: a folder, a list file, a file, a
    glob, or a list of those (:func:`pipeline.inputs.expand_inputs`); default ``run.input`` of the
    config. ``verbose``: Ray's own progress bars and worker logs on the console. ``retry_failed``:
    recordings whose verdict is ``failed`` (not ``rejected``) run again from the stage that failed
    them."""
    t0 = time.time()
    input_spec = input_spec or cfg.run.input
    if not input_spec:
        raise ValueError("no input: name files or folders on the command line or set run.input in the config")
    output = Path(output or cfg.run.output).resolve()
    check_model_paths(cfg)  # before any work: a missing model must not wait until ingest is done
    try:
        lock = _lock(output)
    except OSError as e:
        raise OutputError(f"{output}: cannot create the output folder: {e.strerror or e}") from e
    try:
        inputs = expand_inputs(input_spec)
        current = {i.recording_id: i.content_key for i in inputs if i.verdict is None}
        done = {spec.name: load_outcomes(output, spec) for spec in cfg.stages}
        rows = plan(inputs, cfg.stages, done, retry_failed)
        if retry_failed:
            _forget_crashes(output, cfg.stages, rows)
        _say(f"{len(inputs)} input files; {len(inputs) - len(rows)} already finished; {len(rows)} to run")
        if rows:
            planned = [sum(r["resume_from"] <= i for r in rows) for i in range(len(cfg.stages))]
            progress = Progress([s.name for s in cfg.stages], planned, mode="auto" if cfg.run.progress else "off")
            watcher = _PartWatcher(output, cfg.stages, progress)
            _init_ray(cfg, ray_address, verbose)
            ds = _build(rows, cfg, output, local=not (ray_address or cfg.run.ray.address), verbose=verbose)
            progress.start(watcher)
            try:
                for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    pass
            finally:
                progress.close()
        this_run = report.this_run_costs(output, cfg.stages, t0)  # before publish merges the parts
        # Published only now, after every recording went through: a stopped or failed run leaves
        # the previous outputs as they were (its finished parts stay staged for the next run).
        for spec in cfg.stages:
            publish(output, spec, current)
        (output / "run_config.json").write_text(json.dumps(
            {"config_file": str(cfg.path) if cfg.path else None, "config": cfg.raw,
             "stages": [{"name": s.name, "fingerprint": s.fingerprint} for s in cfg.stages]}, indent=2, default=str))
        done = {spec.name: load_outcomes(output, spec) for spec in cfg.stages}
        for spec in cfg.stages:
            spec.cls.finalize(spec.config, output)
        ledger = build_ledger(output, inputs, cfg.stages, done)
        manifests.write_table(ledger, output / "ledger.parquet")
        if cfg.run.report.enabled:
            report.write_report(output, this_run)
        for spec in cfg.stages:
            o, fresh = done[spec.name], this_run[spec.name]
            if o.audio_seconds > 0:
                _say(f"  {spec.name:<15} {fresh['worker_seconds']:8.1f} worker s this run for "
                     f"{fresh['audio_seconds'] / 3600:.3f} audio h; in all {o.seconds:.1f} s for "
                     f"{o.audio_seconds / 3600:.3f} h (RTF {o.seconds / o.audio_seconds:.4f})")
        counts = Counter(zip(ledger.column("status").to_pylist(), ledger.column("stage").to_pylist()))
        _say("ledger: " + ", ".join(f"{n} {st} at {sg}" for (st, sg), n in sorted(counts.items())))
        return RunResult(output, len(inputs), len(rows), ledger, time.time() - t0)
    except Exception as e:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            raise OutputError(f"{output}: no space left on device ({getattr(e, 'filename', None) or 'writing outputs'}); "
                              "finished work is kept: free space and run again") from e
        raise
    finally:
        lock.close()


class _PartWatcher:
    """Feeds the progress display from the part files that appear during the run (each is one
    finished batch with the verdict of every recording in it); parts present at the start and
    parts of other fingerprints are not this run's work."""

    def __init__(self, output: Path, stages: list[StageSpec], progress: Progress):
        self.dirs = [_staging(output, s.name, s.fingerprint) / "manifest" for s in stages]
        self.fingerprints = [s.fingerprint for s in stages]
        self.progress = progress
        self.seen = [set(os.listdir(d)) if d.is_dir() else set() for d in self.dirs]

    def __call__(self) -> None:
        for i, d in enumerate(self.dirs):
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if name in self.seen[i] or not (name.startswith("part-") and name.endswith(".parquet")):
                    continue
                self.seen[i].add(name)
                meta = part_meta(d / name)
                if meta is None or meta.get("fingerprint") != self.fingerprints[i]:
                    continue
                outcomes = {rid: v[0] for rid, v in meta.get("outcomes", {}).items()}
                self.progress.record(i, outcomes, float(meta.get("audio_seconds") or 0.0))


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


