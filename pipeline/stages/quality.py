"""Quality: DNSMOS P.835 (OVRL/SIG/BAK) per dialogue segment; segments under the cutoff are rejected.

The paper keeps segments with OVRL >= 2.8. Scores are computed on the 16 kHz analysis copy, the
input DNSMOS is defined on. They are stored apart from the cutoffs (``pipeline/scores.py``): a
changed cutoff re-filters the stored scores without loading the model.
"""

from __future__ import annotations

import os

from pydantic import Field

from pipeline.audio import read_span
from pipeline.scores import ScoreStore, key_of, scoring_fingerprint
from pipeline.stage import Resources, Stage, StageConfig


class QualityConfig(StageConfig):
    min_ovrl: float = Field(2.8, ge=1, le=5, description="DNSMOS P.835 OVRL cutoff (the paper: 2.8)")
    min_sig: float | None = Field(None, ge=1, le=5, description="optional SIG cutoff")
    min_bak: float | None = Field(None, ge=1, le=5, description="optional BAK cutoff")


class QualityStage(Stage):
    Config = QualityConfig
    manifest = "quality"
    version = "1"
    thresholds = ("min_ovrl", "min_sig", "min_bak")
    default_resources = Resources(num_cpus=1, batch_size=4, concurrency=1)
    needs = ("audio_path", "segments")
    adds = ()  # segments: dnsmos_ovrl, dnsmos_sig, dnsmos_bak, status, reason

    def setup(self):
        # An actor: the DNSMOS model is loaded on the first segment without a stored score.
        self._dnsmos = None
        self.store = ScoreStore(self.ctx.output_dir, self.ctx.name, scoring_fingerprint(type(self), self.config))

    @property
    def dnsmos(self):
        if self._dnsmos is None:
            from filters.dnsmos import DNSMOS

            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.ctx.device == "cuda" else None
            self._dnsmos = DNSMOS(num_threads=self.ctx.num_threads, providers=providers)
        return self._dnsmos

    @staticmethod
    def _key(row: dict, seg: dict) -> str:
        # The analysis copy is rewritten when its source changes (or ingest runs again): its size
        # and mtime name the audio that was scored.
        st = os.stat(row["audio_path"])
        return key_of("dnsmos", st.st_size, st.st_mtime_ns, round(seg["start"], 4), round(seg["end"], 4))

    def process(self, rows):
        todo = [(r, s) for r in rows for s in r.get("segments") or [] if s["status"] == "ok"]
        keys = [self._key(r, s) for r, s in todo]
        stored = self.store.get(keys)
        missing = [i for i, k in enumerate(keys) if k not in stored]
        if missing:
            # All new segments of the batch go through the model together (windows are batched).
            clips = [read_span(todo[i][0]["audio_path"], todo[i][1]["start"], todo[i][1]["end"])[0] for i in missing]
            new = {keys[i]: {k: float(v) for k, v in sc.items() if k in ("ovrl", "sig", "bak")}
                   for i, sc in zip(missing, self.dnsmos.score_batch(clips))}
            self.store.put(new)
            stored.update(new)
        cfg = self.config
        for (_, seg), key in zip(todo, keys):
            sc = stored[key]
            seg.update(dnsmos_ovrl=round(sc["ovrl"], 4), dnsmos_sig=round(sc["sig"], 4), dnsmos_bak=round(sc["bak"], 4))
            checks = [("ovrl", cfg.min_ovrl), ("sig", cfg.min_sig), ("bak", cfg.min_bak)]
            for name, cut in checks:
                if cut is not None and sc[name] < cut:
                    seg["status"] = "rejected"
                    seg["reason"] = f"dnsmos: {name.upper()} {sc[name]:.2f} < {cut}"
                    break
        out = []
        for r in rows:
            segs = [s for s in r.get("segments") or [] if "dnsmos_ovrl" in s]
            kept = sum(s["status"] == "ok" for s in segs)
            row = dict(r, status="ok", reason=None)
            if not kept:
                row["status"] = "rejected"
                row["reason"] = f"low_quality: all {len(segs)} segments under the DNSMOS cutoff"
            out.append(row)
        return out

    def manifest_rows(self, row):
        return [s for s in row.get("segments") or [] if "dnsmos_ovrl" in s]
