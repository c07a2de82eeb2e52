"""The ledger: one row per input file with where it left the pipeline and why."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from pipeline import manifests
from pipeline.config import StageSpec
from pipeline.inputs import Input
from pipeline.store import StageOutcomes


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

