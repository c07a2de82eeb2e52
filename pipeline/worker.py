"""The Ray worker of one stage: resumed rows in, the stage's model over them, parts out.

A worker process that dies (a decoder abort, an OOM kill) is retried a bounded number of times.
Per-recording crash counters in the staging folder make this converge: after a crash the batch is
re-run one recording at a time, each finished recording is stored at once, and a recording that
took its worker down ``MAX_CRASHES`` times is recorded as ``failed`` ("worker crashed 2 times in
stage X") while the rest of its batch goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifests
from pipeline.atomic import atomic_write
from pipeline.config import StageSpec
from pipeline.stage import StageContext, limit_threads
from pipeline.store import (StageOutcomes, json_default, part_name, staging_dir, load_outcomes, part_meta,
                            read_states, write_parts)

log = logging.getLogger("pipeline")

# The rows that flow between Ray operators: a recording, the first stage it still needs, and its
# accumulated row as JSON ("" when it must be read from the upstream stage's stored state).
FLOW_SCHEMA = pa.schema(
    [("recording_id", pa.string()), ("source_path", pa.string()), ("content_key", pa.string()),
     ("resume_from", pa.int32()), ("state", pa.string())]
)
MAX_CRASHES = 2  # worker deaths on one recording (one of them alone) before it is recorded as failed


@dataclass(frozen=True)
class WorkerSpec:
    spec: StageSpec
    index: int
    upstream: StageSpec | None  # the previous stage (its state feeds resumed rows)
    output: Path
    last: bool


class StageWorker:
    """Runs one stage inside a Ray worker: loads the stage (its model) once, then handles batches."""

    def __init__(self, w: WorkerSpec):
        self.w = w
        limit_threads(max(1, int(round(w.spec.resources.num_cpus))))
        ctx = StageContext(w.spec.name, w.output, w.spec.resources.num_cpus, w.spec.resources.num_gpus)
        self.stage = w.spec.cls(w.spec.config, ctx)
        self._upstream_done: StageOutcomes | None = None
        # JSON of the rows this batch passes on, encoded once for the state part and the flow.
        self._encoded: dict[str, str] = {}
        self.crash_dir = staging_dir(w.output, w.spec.name, w.spec.fingerprint) / "crashes"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        idx = self.w.index
        passing = [r for r in rows if r["resume_from"] > idx]
        todo = [r for r in rows if r["resume_from"] <= idx]
        keys = {r["recording_id"]: r["content_key"] for r in todo}
        states = self._states(todo)
        self._encoded = {}
        results = self._process(states, keys, lambda: self._states(todo)) if states else []
        out = passing + [
            {
                "recording_id": r["recording_id"],
                "source_path": r["source_path"],
                "content_key": keys[r["recording_id"]],
                "resume_from": idx + 1,
                # The last stage's rows are only counted by the driver: keep them small.
                "state": "" if self.w.last else
                self._encoded.get(r["recording_id"]) or json.dumps(r, default=json_default),
            }
            for r in results
            if r["status"] == "ok"
        ]
        self._encoded = {}
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
        atomic_write(self.crash_dir / name, str(n))

    def _clear_crashes(self, name: str) -> None:
        (self.crash_dir / name).unlink(missing_ok=True)

    def _process(self, states: list[dict], keys: dict[str, str], fresh) -> list[dict]:
        """``fresh()``: the same rows decoded again (for a retry after a failed batch)."""
        missing = [s for s in states if s.get("_missing")]
        present = [s for s in states if not s.get("_missing")]
        for s in missing:
            del s["_missing"]
            s.update(status="failed", reason=f"resume: no stored output of stage {self.w.upstream.name!r}")
        # One marker per batch while it runs (Ray retries a task with the same rows): found on
        # entry, it means a worker died on this batch before.
        batch = part_name(self.w.spec.fingerprint, [s["recording_id"] for s in present]).replace(".parquet", "")
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
                results = self.stage.process(present)
                if len(results) != len(present):
                    raise RuntimeError(f"stage returned {len(results)} rows for {len(present)}")
            except Exception:
                # Isolate the recording that breaks the batch; the others go on, from rows decoded
                # anew: a stage that failed half-way may have altered the ones it was given.
                again = [s for s in fresh() if not s.get("_missing")]
                results = [self._process_one(s) for s in again]
        self._write(results + missing, keys, time.perf_counter() - t0)
        self._clear_crashes(batch)
        return results + missing

    def _guarded_one(self, state: dict, keys: dict[str, str]) -> dict:
        rid = state["recording_id"]
        name = part_name(self.w.spec.fingerprint, [rid])
        stage_dir = staging_dir(self.w.output, self.w.spec.name, self.w.spec.fingerprint)
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
        for r in results:
            if r["status"] == "ok":
                self._encoded[r["recording_id"]] = json.dumps(r, default=json_default)
        write_parts(self.w.output, self.w.spec, results, manifest_rows, seconds, keys, self._encoded)

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


def run_task(batch: pa.Table, w: WorkerSpec) -> pa.Table:
    return StageWorker(w)(batch)
