"""Export: the kept dialogue segments as an OpenDialog-layout corpus.

Workers encode each kept segment's audio (24 kHz mono, cut from the ORIGINAL source file and
resampled once at full quality) into the audio store ``<output>/cache/export/``, named by an audio
key (the source file's identity, the span and the encoding settings): a segment whose key is
already there is not encoded again. Nothing is written into the corpus folder while a run works:
at the end of a run that finished, ``finalize`` builds the corpus of exactly the kept segments and
swaps it in whole (``pipeline/corpus.py``).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import soundfile as sf
from pydantic import Field, field_validator

from pipeline import corpus, manifests
from pipeline.atomic import atomic_write
from pipeline.audio import read_source_span, sanitize
from pipeline.inputs import fs_path
from pipeline.scores import key_of
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
    version = "2"  # audio into the store, the corpus built at the end of the run
    default_resources = Resources(num_cpus=1, batch_size=4, concurrency=(1, 2))
    needs = ("source_path", "segments")
    adds = ()  # segments: path, status, reason

    def process(self, rows):
        cfg = self.config
        store = self.ctx.output_dir / corpus.STORE
        out = []
        for row in rows:
            segs = [s for s in row.get("segments") or [] if s["status"] == "ok"]
            for seg in segs:
                try:
                    lang = seg.get("language") or "und"
                    if not LANGUAGE_CODE.match(lang):
                        raise ValueError(f"language {lang!r} is not a language code")
                    rel = Path("audio") / lang / f"{seg['segment_id']}{SUFFIX[cfg.format]}"
                    inside(Path("/corpus"), Path("/corpus") / rel)
                    src = fs_path(row["source_path"])
                    st = os.stat(src)
                    key = key_of("export", 1, st.st_size, st.st_mtime_ns, round(seg["start"], 4), round(seg["end"], 4),
                                 cfg.format, cfg.sample_rate, cfg.peak_normalize)
                    target = store / key[:2] / f"{key}{SUFFIX[cfg.format]}"
                    if target.exists():  # encoded by an earlier run: the same audio
                        frames = sf.info(str(target)).frames
                    else:
                        audio = sanitize(read_source_span(src, seg["start"], seg["end"], cfg.sample_rate))
                        if not len(audio):
                            raise ValueError("no samples in the source span")
                        if cfg.peak_normalize and np.abs(audio).max() > 0:
                            audio = audio * (0.891 / np.abs(audio).max())
                        write_segment_audio(target, audio, cfg.sample_rate, cfg.format)
                        frames = len(audio)
                    seg["path"], seg["audio_key"] = rel.as_posix(), key
                    seg["exported_duration"] = round(frames / cfg.sample_rate, 4)
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
        try:
            manifests.read_manifest(output_dir, "export", "export")
        except manifests.ManifestError:
            return
        corpus.publish(output_dir, output_dir / config.dir, config.sample_rate)
