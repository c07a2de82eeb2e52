"""Score once, filter many: what a scoring model said, stored apart from the thresholds applied to it.

A stage that scores (DNSMOS, the dialogue classifier) splits its config in two: the scoring part
(model, windowing, prompt: whatever changes the numbers) and its thresholds (``Stage.thresholds``).
Scores are stored under ``<output>/cache/scores/<stage>/<scoring fingerprint>/`` keyed by what was
scored (a segment's audio span, a transcript). A threshold change still changes the stage's
fingerprint, so the stage and everything after it run again, but the stage reads its scores back
instead of calling the model: re-filtering costs seconds, and raising then lowering a cutoff
brings the same segments back with the same scores. Only a change of the scoring part (or a new
recording) calls the model.

Each batch's new scores land in one Parquet part (written atomically, named by its keys), so
concurrent workers never write the same file and a killed run keeps what it scored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write

SCORES_DIR = Path("cache") / "scores"


def scoring_fingerprint(stage_cls: type, config: Any) -> str:
    """Hash of what makes the scores: the stage class and version and its config without the
    thresholds (and without resources, which change speed, not results)."""
    exclude = {"resources", "uses", *getattr(stage_cls, "thresholds", ())}
    payload = {"stage": f"{stage_cls.__module__}.{stage_cls.__qualname__}", "version": stage_cls.version,
               "scoring_version": getattr(stage_cls, "scoring_version", "1"),
               "config": config.model_dump(mode="json", exclude=exclude)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def key_of(*parts: Any) -> str:
    """A stable key for what was scored (JSON of the parts, hashed)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ScoreStore:
    """The stored scores of one stage at one scoring fingerprint."""

    def __init__(self, output: Path, stage: str, fingerprint: str):
        self.dir = Path(output) / SCORES_DIR / stage / fingerprint

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def get(self, keys: list[str]) -> dict[str, dict]:
        files = self.parts()
        if not keys or not files:
            return {}
        try:
            table = pads.dataset([str(f) for f in files], format="parquet").to_table(
                filter=pads.field("key").isin(sorted(set(keys))))
        except (OSError, pa.ArrowInvalid):  # a damaged part: its keys are scored again
            return {}
        return {k: json.loads(v) for k, v in zip(table.column("key").to_pylist(), table.column("value").to_pylist())}

    def put(self, values: dict[str, dict]) -> None:
        if not values:
            return
        keys = sorted(values)
        name = "part-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20] + ".parquet"
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "value": pa.array([json.dumps(values[k], sort_keys=True) for k in keys], pa.string())})
        atomic_write(self.dir / name, lambda tmp: pq.write_table(table, tmp))
