"""The driver: a config's stages -> one streaming Ray Data pipeline over the inputs, resumable.

Rows are recordings. A rerun reads the verdicts of every stage first (``pipeline.store``):
recordings a stage already finished with the same fingerprint and the same content key skip it;
a changed config or a changed file runs again from the stage concerned. The stages run as Ray
Data operators (``pipeline.dataflow``, ``pipeline.worker``); only when every recording went
through are the staged parts published, the ledger written (``pipeline.ledger``) and the report
made.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline import manifests, report
from pipeline.atomic import atomic_write
from pipeline.config import PipelineConfig, StageSpec, check_model_paths
from pipeline.dataflow import build, init_ray
from pipeline.inputs import Input, expand_inputs
from pipeline.ledger import build_ledger
from pipeline.progress import Progress, say
from pipeline.store import (OutputError, StageOutcomes, forget_crashes, load_outcomes, lock_output, part_meta,
                            publish, staging_dir)


@dataclass
class RunResult:
    output: Path
    num_inputs: int
    processed: int
    ledger: pa.Table
    seconds: float


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
        lock = lock_output(output)
    except OSError as e:
        raise OutputError(f"{output}: cannot create the output folder: {e.strerror or e}") from e
    try:
        inputs = expand_inputs(input_spec)
        current = {i.recording_id: i.content_key for i in inputs if i.verdict is None}
        done = {spec.name: load_outcomes(output, spec) for spec in cfg.stages}
        rows = plan(inputs, cfg.stages, done, retry_failed)
        if retry_failed:
            forget_crashes(output, cfg.stages, rows)
        say(f"{len(inputs)} input files; {len(inputs) - len(rows)} already finished; {len(rows)} to run")
        if rows:
            planned = [sum(r["resume_from"] <= i for r in rows) for i in range(len(cfg.stages))]
            progress = Progress([s.name for s in cfg.stages], planned, mode="auto" if cfg.run.progress else "off")
            watcher = _PartWatcher(output, cfg.stages, progress)
            init_ray(cfg, ray_address, verbose)
            ds = build(rows, cfg, output, local=not (ray_address or cfg.run.ray.address), verbose=verbose)
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
        atomic_write(output / "run_config.json", json.dumps(
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
                say(f"  {spec.name:<15} {fresh['worker_seconds']:8.1f} worker s this run for "
                     f"{fresh['audio_seconds'] / 3600:.3f} audio h; in all {o.seconds:.1f} s for "
                     f"{o.audio_seconds / 3600:.3f} h (RTF {o.seconds / o.audio_seconds:.4f})")
        counts = Counter(zip(ledger.column("status").to_pylist(), ledger.column("stage").to_pylist()))
        say("ledger: " + ", ".join(f"{n} {st} at {sg}" for (st, sg), n in sorted(counts.items())))
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
        self.dirs = [staging_dir(output, s.name, s.fingerprint) / "manifest" for s in stages]
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

