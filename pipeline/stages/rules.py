"""Rules: reject dialogue segments whose WhisperD transcript looks wrong (paper section 5.3).

The checks themselves live in ``filters/rules.py`` (pure functions of a segment); this stage applies
them to every segment the segments stage kept, records each segment's verdict and metrics, and
keeps the recording while at least one of its segments passes.
"""

from __future__ import annotations

import math
from collections import Counter

from filters.rules import RulesConfig, apply_rules
from pipeline.stage import Resources, Stage, StageConfig


class RulesStageConfig(StageConfig, RulesConfig):
    """The rules' thresholds as a stage section (with ``uses`` and ``resources``)."""


def _finite(metrics: dict) -> dict:
    """NaN/inf metrics become null: rows travel as JSON and end as Parquet structs."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class RulesStage(Stage):
    Config = RulesStageConfig
    manifest = "rules"
    version = "2"  # metrics as a struct
    default_resources = Resources(num_cpus=0.5, batch_size=32, concurrency=2)
    needs = ("segments",)
    adds = ()  # segments: status, reason, metrics

    def process(self, rows):
        return [self._recording(r) for r in rows]

    def _recording(self, row: dict) -> dict:
        segments = row["segments"]
        out, failed = [], Counter()
        checked = 0
        for seg in segments:
            if seg.get("status") != "ok":  # rejected upstream: keep its verdict
                out.append(seg)
                continue
            checked += 1
            v = apply_rules(seg, self.config)
            if not v.ok:
                failed[v.rule] += 1
            out.append(dict(seg, status="ok" if v.ok else "rejected", reason=v.reason, metrics=_finite(v.metrics)))
        r = dict(row, segments=out, status="ok", reason=None)
        if checked == 0:
            r["status"], r["reason"] = "rejected", "rules: no segment with status ok to check"
        elif sum(failed.values()) == checked:
            summary = ", ".join(f"{rule} x{n}" for rule, n in sorted(failed.items(), key=lambda kv: (-kv[1], kv[0])))
            noun = "segment" if checked == 1 else "segments"
            r["status"], r["reason"] = "rejected", f"all {checked} {noun} rejected by rules: {summary}"
        return r

    def manifest_rows(self, row):
        rid, segments = row["recording_id"], row.get("segments")
        if not isinstance(segments, list):
            return []
        return [
            {
                "segment_id": s["segment_id"],
                "recording_id": s.get("recording_id") or rid,
                "start": s["start"],
                "end": s["end"],
                "status": s.get("status"),
                "reason": s.get("reason"),
                "metrics": s.get("metrics"),
            }
            for s in segments
        ]
