"""Quality: DNSMOS P.835 (OVRL/SIG/BAK) per dialogue segment; segments under the cutoff are rejected.

The paper keeps segments with OVRL >= 2.8. Scores are computed on the 16 kHz analysis copy, the
input DNSMOS is defined on.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.audio import read_span
from pipeline.stage import Resources, Stage, StageConfig


class QualityConfig(StageConfig):
    min_ovrl: float = Field(2.8, ge=1, le=5, description="DNSMOS P.835 OVRL cutoff (the paper: 2.8)")
    min_sig: float | None = Field(None, ge=1, le=5, description="optional SIG cutoff")
    min_bak: float | None = Field(None, ge=1, le=5, description="optional BAK cutoff")


class QualityStage(Stage):
    Config = QualityConfig
    manifest = "quality"
    version = "1"
    default_resources = Resources(num_cpus=1, batch_size=4, concurrency=1)
    needs = ("audio_path", "segments")
    adds = ()  # segments: dnsmos_ovrl, dnsmos_sig, dnsmos_bak, status, reason

    def setup(self):
        ctx = self.ctx
        from filters.dnsmos import DNSMOS

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ctx.device == "cuda" else None
        self.dnsmos = DNSMOS(num_threads=ctx.num_threads, providers=providers)

    def process(self, rows):
        # All segments of the batch go through the model together (windows are batched).
        todo = [(r, s) for r in rows for s in r.get("segments") or [] if s["status"] == "ok"]
        clips = [read_span(r["audio_path"], s["start"], s["end"])[0] for r, s in todo]
        scores = self.dnsmos.score_batch(clips) if clips else []
        cfg = self.config
        for (_, seg), sc in zip(todo, scores):
            seg.update(dnsmos_ovrl=round(sc["ovrl"], 4), dnsmos_sig=round(sc["sig"], 4), dnsmos_bak=round(sc["bak"], 4))
            checks = [("ovrl", cfg.min_ovrl), ("sig", cfg.min_sig), ("bak", cfg.min_bak)]
            for key, cut in checks:
                if cut is not None and sc[key] < cut:
                    seg["status"] = "rejected"
                    seg["reason"] = f"dnsmos: {key.upper()} {sc[key]:.2f} < {cut}"
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
