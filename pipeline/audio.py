"""Audio decoding with bounded memory: soundfile (libsndfile) first, ffmpeg for the rest.

Analysis stages read a 16 kHz mono copy made once by the ingest stage; the export cuts spans of
the original file. Nothing here loads a whole long file into memory: decoding streams blocks
through a streaming resampler.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ANALYSIS_SR = 16000
BLOCK_SECONDS = 20.0


class AudioError(ValueError):
    """A file cannot be used as audio. ``kind`` says why: empty, not_audio, unsupported,
    no_samples, truncated, corrupt."""

    def __init__(self, path: str | Path, kind: str, detail: str):
        self.path = str(path)
        self.kind = kind
        self.detail = detail
        super().__init__(f"{path}: {kind.replace('_', ' ')}: {detail}")


@dataclass(frozen=True)
class AudioInfo:
    format: str
    codec: str
    sample_rate: int
    channels: int
    frames: int  # as declared by the container (may be an estimate for compressed formats)
    duration: float
    decoder: str  # "soundfile" or "ffmpeg"


def _ffprobe(path: Path) -> AudioInfo | None:
    if not shutil.which("ffprobe"):
        return None
    cmd = [
        "ffprobe", "-v", "error", "-select_streams", "a:0",
        "-show_entries", "stream=codec_name,sample_rate,channels,duration:format=format_name,duration",
        "-of", "json", str(path),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    info = json.loads(res.stdout or "{}")
    streams = info.get("streams") or []
    if not streams:
        return None
    s = streams[0]
    sr = int(s.get("sample_rate") or 0)
    duration = float(s.get("duration") or info.get("format", {}).get("duration") or 0.0)
    return AudioInfo(
        format=info.get("format", {}).get("format_name", "unknown"),
        codec=s.get("codec_name", "unknown"),
        sample_rate=sr,
        channels=int(s.get("channels") or 0),
        frames=int(round(duration * sr)),
        duration=duration,
        decoder="ffmpeg",
    )


def probe(path: str | Path) -> AudioInfo:
    """Describe an audio file or raise AudioError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "not_audio", "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty", "file is empty (0 bytes)")
    try:
        i = sf.info(str(path))
        info = AudioInfo(i.format, i.subtype, int(i.samplerate), int(i.channels), int(i.frames),
                         float(i.frames) / i.samplerate if i.samplerate else 0.0, "soundfile")
    except (sf.LibsndfileError, RuntimeError, TypeError):
        info = _ffprobe(path)
        if info is None:
            if shutil.which("ffprobe") is None:
                raise AudioError(path, "unsupported", "libsndfile cannot read it and ffmpeg is not installed")
            raise AudioError(path, "not_audio", "neither libsndfile nor ffmpeg recognise an audio stream")
    if info.sample_rate <= 0 or info.channels <= 0:
        raise AudioError(path, "corrupt", f"invalid header (sample rate {info.sample_rate}, channels {info.channels})")
    if info.decoder == "soundfile" and info.format in ("WAV", "WAVEX", "RF64"):
        declared = _wav_declared_data_bytes(path)
        if declared is not None:
            available = path.stat().st_size - declared[1]
            if declared[0] > available + 1:
                raise AudioError(
                    path, "truncated",
                    f"header declares {declared[0]} bytes of samples but only {max(available, 0)} are present",
                )
    return info


def _wav_declared_data_bytes(path: Path) -> tuple[int, int] | None:
    """(declared size of the data chunk, its offset) from a RIFF header, or None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                return (size, f.tell()) if size != 0xFFFFFFFF else None
            f.seek(size + (size & 1), 1)


def _ffmpeg_pcm(path: Path, sample_rate: int, channels: int | None, start: float = 0.0,
                duration: float | None = None) -> subprocess.Popen:
    cmd = ["ffmpeg", "-nostdin", "-v", "error"]
    if start > 0:
        cmd += ["-ss", f"{start:.6f}"]
    cmd += ["-i", str(path)]
    if duration is not None:
        cmd += ["-t", f"{duration:.6f}"]
    cmd += ["-vn", "-f", "f32le", "-ar", str(sample_rate)]
    if channels:
        cmd += ["-ac", str(channels)]
    cmd += ["pipe:1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def iter_blocks(path: str | Path, info: AudioInfo | None = None, block_seconds: float = BLOCK_SECONDS):
    """Yield (mono float32 block, sample_rate) from the start of a file, in its own rate."""
    path = Path(path)
    info = info or probe(path)
    if info.decoder == "soundfile":
        block = max(1, int(block_seconds * info.sample_rate))
        try:
            with sf.SoundFile(str(path)) as f:
                for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                    yield data.mean(axis=1), info.sample_rate
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(path, "corrupt", f"decoding failed: {e}") from e
        return
    proc = _ffmpeg_pcm(path, info.sample_rate, 1)
    nbytes = int(block_seconds * info.sample_rate) * 4
    assert proc.stdout is not None
    while True:
        buf = proc.stdout.read(nbytes)
        if not buf:
            break
        yield np.frombuffer(buf[: len(buf) // 4 * 4], dtype=np.float32), info.sample_rate
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    if proc.wait() != 0:
        raise AudioError(path, "corrupt", f"ffmpeg failed: {err[-300:]}")


def decode_to_wav(path: str | Path, out_path: str | Path, info: AudioInfo | None = None,
                  sample_rate: int = ANALYSIS_SR) -> int:
    """Decode any supported file to a mono PCM-16 wav at ``sample_rate``; return its frame count.

    Memory stays at one block whatever the file length. The output appears atomically."""
    path, out_path = Path(path), Path(out_path)
    info = info or probe(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    frames = 0
    resampler = None
    with sf.SoundFile(str(tmp), "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="WAV") as out:
        for block, sr in iter_blocks(path, info):
            if sr != sample_rate:
                if resampler is None:
                    resampler = soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality="HQ")
                block = resampler.resample_chunk(block)
            if len(block):
                out.write(np.clip(block, -1.0, 1.0))
                frames += len(block)
        if resampler is not None:
            tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                out.write(np.clip(tail, -1.0, 1.0))
                frames += len(tail)
    if info.decoder == "soundfile" and info.format in ("FLAC", "AIFF", "CAF", "W64", "WAV", "WAVEX"):
        expected = info.frames * sample_rate / info.sample_rate
        if frames + 0.01 * sample_rate < expected * 0.995:
            tmp.unlink(missing_ok=True)
            raise AudioError(path, "truncated",
                             f"decoded {frames / sample_rate:.2f} s of the {info.duration:.2f} s the header declares")
    tmp.replace(out_path)
    return frames


def read_span(path: str | Path, start: float = 0.0, end: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of [start, end) seconds of a file libsndfile can seek in."""
    with sf.SoundFile(str(path)) as f:
        sr = f.samplerate
        a = max(0, int(round(start * sr)))
        b = f.frames if end is None else min(f.frames, int(round(end * sr)))
        if b <= a:
            return np.zeros(0, np.float32), sr
        f.seek(a)
        data = f.read(b - a, dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def read_source_span(path: str | Path, start: float, end: float, sample_rate: int) -> np.ndarray:
    """Mono float32 span of the ORIGINAL source file, resampled to ``sample_rate`` at full quality."""
    path = Path(path)
    info = probe(path)
    if info.decoder == "soundfile":
        data, sr = read_span(path, start, end)
        if sr != sample_rate and len(data):
            data = soxr.resample(data, sr, sample_rate, quality="VHQ").astype(np.float32)
        return data
    proc = _ffmpeg_pcm(path, sample_rate, 1, start=start, duration=end - start)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise AudioError(path, "corrupt", f"ffmpeg failed: {err.decode(errors='replace')[-300:]}")
    return np.frombuffer(out[: len(out) // 4 * 4], dtype=np.float32).copy()
