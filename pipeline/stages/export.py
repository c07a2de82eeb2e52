"""Export: the kept dialogue segments as an OpenDialog-layout corpus.

``<output>/<dir>/`` gets ``audio/<lang>/<segment_id>.mp3`` (24 kHz mono, cut from the ORIGINAL
source file and resampled once at full quality), ``manifest.<lang>.jsonl`` (``id``, ``text``,
``path`` relative to the export folder: the released OpenDialog layout, read directly by the
trainer), ``cuts.<lang>.jsonl.gz`` (lhotse MonoCut lines) and ``segments.parquet`` (every metric
gathered along the pipeline, one row per exported segment).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import Field, field_validator

from pipeline import manifests
from pipeline.atomic import atomic_write
from pipeline.audio import read_source_span, sanitize
from pipeline.inputs import fs_path
from pipeline.stage import LANGUAGE_CODE, Resources, Stage, StageConfig

SUFFIX = {"mp3": ".mp3", "flac": ".flac", "wav": ".wav"}


class ExportConfig(StageConfig):
    dir: str = Field("export", description="export folder, relative to the run's output folder")
    format: Literal["mp3", "flac", "wav"] = "mp3"
    sample_rate: int = Field(24000, ge=8000, le=48000)
    peak_normalize: bool = Field(False, description="scale each segment so its peak is at -1 dBFS")

    @field_validator("dir")
    @classmethod
    def _inside_output(cls, v: str) -> str:
        p = PurePosixPath(v.replace("\\", "/"))
        if not v.strip() or p.is_absolute() or Path(v).is_absolute() or ".." in p.parts or p == PurePosixPath("."):
            raise ValueError(f"{v!r}: must be a relative folder inside the output folder (no '..', not absolute)")
        if p.parts[0] in ("manifests", "cache", ".state"):
            raise ValueError(f"{v!r}: {p.parts[0]}/ belongs to the pipeline's own files")
        return v


def inside(root: Path, path: Path) -> Path:
    """``path`` if it stays inside ``root`` once resolved, else ValueError: no value read from
    data or config may make a writer leave its folder."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(f"{path} would leave {root}")
    return path


def write_segment_audio(path: Path, audio: np.ndarray, sample_rate: int, fmt: str) -> None:
    audio = sanitize(np.asarray(audio, dtype=np.float32))

    def write(tmp: Path) -> None:
        if fmt == "mp3":
            # compression_level 0 = the highest bitrate the sample rate allows (160 kbps at 24 kHz).
            with sf.SoundFile(str(tmp), "w", samplerate=sample_rate, channels=1, format="MP3",
                              subtype="MPEG_LAYER_III", compression_level=0.0, bitrate_mode="CONSTANT") as f:
                f.write(audio)
        else:
            sf.write(str(tmp), audio, sample_rate, format=fmt.upper(), subtype="PCM_16")

    atomic_write(path, write)


class ExportStage(Stage):
    Config = ExportConfig
    manifest = "export"
    version = "1"
    default_resources = Resources(num_cpus=1, batch_size=4, concurrency=(1, 2))
    needs = ("source_path", "segments")
    adds = ()  # segments: path, status, reason

    def process(self, rows):
        cfg = self.config
        root = self.ctx.output_dir / cfg.dir
        out = []
        for row in rows:
            segs = [s for s in row.get("segments") or [] if s["status"] == "ok"]
            for seg in segs:
                try:
                    lang = seg.get("language") or "und"
                    if not LANGUAGE_CODE.match(lang):
                        raise ValueError(f"language {lang!r} is not a language code")
                    rel = Path("audio") / lang / f"{seg['segment_id']}{SUFFIX[cfg.format]}"
                    inside(root, root / rel)
                    audio = sanitize(read_source_span(fs_path(row["source_path"]), seg["start"], seg["end"],
                                                      cfg.sample_rate))
                    if not len(audio):
                        raise ValueError("no samples in the source span")
                    if cfg.peak_normalize and np.abs(audio).max() > 0:
                        audio = audio * (0.891 / np.abs(audio).max())
                    write_segment_audio(root / rel, audio, cfg.sample_rate, cfg.format)
                    seg["path"] = rel.as_posix()
                    seg["exported_duration"] = round(len(audio) / cfg.sample_rate, 4)
                except Exception as e:  # noqa: BLE001 - one bad segment must not lose the others
                    seg["status"], seg["reason"] = "failed", f"export: {type(e).__name__}: {e}"[:300]
            kept = sum(s["status"] == "ok" for s in segs)
            r = dict(row, status="ok" if kept else "failed", reason=None if kept else "export: no segment written")
            out.append(r)
        return out

    def manifest_rows(self, row):
        return [dict(s, source_path=row["source_path"]) for s in row.get("segments") or [] if s.get("path") or
                (s["status"] == "failed" and (s.get("reason") or "").startswith("export"))]

    @classmethod
    def finalize(cls, config: ExportConfig, output_dir: Path) -> None:
        root = output_dir / config.dir
        try:
            table = manifests.read_manifest(output_dir, "export", "export")
        except manifests.ManifestError:
            return
        rows = [r for r in table.to_pylist() if r["status"] == "ok"]
        root.mkdir(parents=True, exist_ok=True)
        _remove_unlisted_audio(root, {r["path"] for r in rows})
        manifests.write_table(manifests.to_table("export", rows), root / "segments.parquet")
        by_lang: dict[str, list[dict]] = {}
        for r in rows:
            by_lang.setdefault(r["language"] or "und", []).append(r)
        for old in list(root.glob("manifest.*.jsonl")) + list(root.glob("cuts.*.jsonl.gz")):
            if old.name.split(".")[1] not in by_lang:
                old.unlink()
        for lang, items in by_lang.items():
            _atomic_text(root / f"manifest.{lang}.jsonl", "".join(
                json.dumps({"id": r["segment_id"], "text": r["text"], "path": r["path"]}, ensure_ascii=False) + "\n"
                for r in items))
            _atomic_gzip(root / f"cuts.{lang}.jsonl.gz", "".join(
                json.dumps(_lhotse_cut(r, config.sample_rate, root), ensure_ascii=False) + "\n" for r in items))


def _lhotse_cut(r: dict, sample_rate: int, root: Path) -> dict:
    """A lhotse MonoCut dict: the recording is the exported file, the supervision the whole of it."""
    path = root / r["path"]
    num_samples = sf.info(str(path)).frames if path.exists() else int(round(r["duration"] * sample_rate))
    duration = round(num_samples / sample_rate, 6)
    rec_id = Path(r["path"]).stem
    return {
        "id": r["segment_id"],
        "start": 0.0,
        "duration": duration,
        "channel": 0,
        "supervisions": [{
            "id": r["segment_id"], "recording_id": rec_id, "start": 0.0, "duration": duration, "channel": 0,
            "text": r["text"], "language": r["language"],
            "custom": {"source_recording_id": r["recording_id"], "source_start": r["start"], "source_end": r["end"],
                       "num_turns": r["num_turns"], "dnsmos_ovrl": r["dnsmos_ovrl"], "agreement": r["agreement"]},
        }],
        "recording": {
            "id": rec_id,
            "sources": [{"type": "file", "channels": [0], "source": str(path.resolve())}],
            "sampling_rate": sample_rate, "num_samples": num_samples, "duration": duration, "channel_ids": [0],
        },
        "type": "MonoCut",
    }


def _remove_unlisted_audio(root: Path, listed: set[str]) -> None:
    """Audio files of segments that left the corpus (their input was removed or changed, or a
    config change dropped them) go too: the folder holds exactly what the manifests list."""
    audio = root / "audio"
    if not audio.is_dir():
        return
    for dirpath, _, names in os.walk(audio):
        for name in names:
            p = Path(dirpath) / name
            if p.suffix in SUFFIX.values() and p.relative_to(root).as_posix() not in listed:
                p.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def _atomic_gzip(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
