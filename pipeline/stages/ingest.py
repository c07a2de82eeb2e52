"""Ingest: probe every input file and decode it once into a 16 kHz mono analysis copy."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.audio import ANALYSIS_SR, AudioError, decode_to_wav, probe
from pipeline.inputs import fs_path
from pipeline.stage import Resources, Stage, StageConfig

# Files that are not usable audio by nature are "rejected"; files that look like audio but cannot
# be decoded (or read) are "failed": ``--retry-failed`` runs those again.
_REJECT_KINDS = {"empty", "not_audio", "unsupported", "no_samples", "too_short", "too_long", "non_finite"}


class IngestConfig(StageConfig):
    min_duration: float = Field(0.5, ge=0, description="seconds; shorter recordings are rejected")
    # A default bound: a tiny file whose header declares a very low rate or a huge length would
    # otherwise become an analysis copy of many hours.
    max_duration: float | None = Field(4 * 3600.0, gt=0,
                                       description="seconds; longer recordings are rejected (null: no limit)")


class IngestStage(Stage):
    Config = IngestConfig
    manifest = "recordings"
    version = "2"
    # Decoding is CPU work with no model: plain tasks, several files per task.
    default_resources = Resources(num_cpus=1, batch_size=4, concurrency=(1, 8))
    needs = ("source_path",)
    adds = ("format", "codec", "sample_rate", "channels", "duration", "num_bytes", "audio_path")

    def process(self, rows):
        return [self._one(r) for r in rows]

    def _one(self, row):
        path = Path(fs_path(row["source_path"]))
        out = dict(row, status="ok", reason=None)
        cfg = self.config
        try:
            out["num_bytes"] = path.stat().st_size
            with open(path, "rb") as f:  # an unreadable file is a permission problem, not "not audio"
                f.read(1)
            info = probe(path)
            out.update(format=info.format, codec=info.codec, sample_rate=info.sample_rate,
                       channels=info.channels, duration=info.duration)
            if info.frames == 0:
                raise AudioError(path, "no_samples", "the file holds no audio samples")
            if cfg.max_duration is not None and info.duration > cfg.max_duration * 1.01:
                raise AudioError(path, "too_long", f"header declares {info.duration:.1f} s > max_duration {cfg.max_duration} s")
            cache = self.ctx.cache_dir / "audio16k" / f"{row['recording_id']}.wav"
            frames = decode_to_wav(path, cache, info, ANALYSIS_SR)
            if frames == 0:
                raise AudioError(path, "no_samples", "decoding produced no samples")
            out["duration"] = frames / ANALYSIS_SR
            out["audio_path"] = str(cache)
            if out["duration"] < cfg.min_duration:
                raise AudioError(path, "too_short", f"{out['duration']:.2f} s < min_duration {cfg.min_duration} s")
            if cfg.max_duration is not None and out["duration"] > cfg.max_duration:
                raise AudioError(path, "too_long", f"{out['duration']:.1f} s > max_duration {cfg.max_duration} s")
        except AudioError as e:
            out["status"] = "rejected" if e.kind in _REJECT_KINDS else "failed"
            out["reason"] = f"{e.kind}: {e.detail}"
        except PermissionError as e:
            out["status"], out["reason"] = "failed", f"permission_denied: {e.strerror}"
        except OSError as e:
            out["status"], out["reason"] = "failed", f"io_error: {e}"
        return out
