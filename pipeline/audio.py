"""Audio decoding with bounded memory: soundfile (libsndfile) first, ffmpeg for the rest.

Analysis stages read a 16 kHz mono copy made once by the ingest stage; the export cuts spans of
the original file. Nothing here loads a whole long file into memory: decoding streams blocks
through a streaming resampler.

Every external decoder runs with a bound: its stderr goes to a file (a chatty decoder never
blocks on a full pipe), a watchdog kills it after a time scaled by the file's duration, and it
may not produce much more audio than the file declares. Playlist-like containers (ffconcat, HLS,
DASH) are refused: they make ffmpeg read other files, possibly without end.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipeline.atomic import atomic_write

ANALYSIS_SR = 16000
BLOCK_SECONDS = 20.0
MIN_SAMPLE_RATE = 4000  # below this a "recording" is a broken or hostile header, not speech
PROBE_TIMEOUT = 30.0
DECODE_TIMEOUT_BASE = 120.0
# Containers whose "audio" is a list of other files or URLs: ffmpeg would open those (a
# self-referencing ffconcat file recurses without end), so they are refused before ffmpeg runs.
PLAYLIST_FORMATS = {"concat", "hls", "applehttp", "dash", "image2", "ffmetadata", "tee", "sdp", "rtsp"}
PLAYLIST_MAGIC = (b"ffconcat", b"#EXTM3U", b"#EXT-X-", b"<?xml", b"<MPD", b"v=0\r\n", b"v=0\n")


def decode_timeout(duration: float | None) -> float:
    """Seconds a decoder may take for ``duration`` seconds of audio: ffmpeg decodes far faster
    than real time, so real time plus two minutes only ever stops a stuck or looping decoder."""
    if not duration or duration <= 0:
        return DECODE_TIMEOUT_BASE + 1800.0
    return DECODE_TIMEOUT_BASE + 1.0 * duration


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
        "ffprobe", "-v", "error", "-protocol_whitelist", "file", "-select_streams", "a:0",
        "-show_entries", "stream=codec_name,sample_rate,channels,duration:format=format_name,duration",
        "-of", "json", str(path),
    ]
    try:
        # run() drains stdout and stderr together: a flood on either cannot block.
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AudioError(path, "corrupt", f"ffprobe did not finish within {PROBE_TIMEOUT:.0f} s") from None
    if res.returncode != 0:
        return None
    try:
        info = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return None
    fmt = str(info.get("format", {}).get("format_name", ""))
    if set(fmt.split(",")) & PLAYLIST_FORMATS:
        raise AudioError(path, "unsupported", f"a {fmt} playlist (it names other files), not audio")
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
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(PLAYLIST_MAGIC):
        raise AudioError(path, "unsupported", "a playlist or concat list (it names other files), not audio")
    try:
        i = sf.info(os.fsencode(path))
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
    if info.sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(path, "unsupported",
                         f"sample rate {info.sample_rate} Hz is below {MIN_SAMPLE_RATE} Hz (not speech audio)")
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


class _Ffmpeg:
    """ffmpeg decoding to float32 PCM on stdout, with stderr in a temporary file and a watchdog
    that kills it after ``timeout`` seconds."""

    def __init__(self, path: Path, sample_rate: int, channels: int | None, timeout: float,
                 start: float = 0.0, duration: float | None = None):
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-protocol_whitelist", "file"]
        if start > 0:
            cmd += ["-ss", f"{start:.6f}"]
        cmd += ["-i", str(path)]
        if duration is not None:
            cmd += ["-t", f"{duration:.6f}"]
        cmd += ["-vn", "-f", "f32le", "-ar", str(sample_rate)]
        if channels:
            cmd += ["-ac", str(channels)]
        cmd += ["pipe:1"]
        self.path, self.timeout = path, timeout
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr)
        self.timed_out = False
        self.timer = threading.Timer(timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def kill(self) -> None:
        self.proc.kill()

    def finish(self) -> None:
        """Wait for the exit; raise AudioError naming the problem when it did not end well."""
        self.timer.cancel()
        if self.proc.stdout:
            self.proc.stdout.close()
        code = self.proc.wait()
        self.stderr.seek(0, 2)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - 600))
        err = self.stderr.read().decode(errors="replace").strip()
        self.stderr.close()
        if self.timed_out:
            raise AudioError(self.path, "corrupt", f"ffmpeg did not finish within {self.timeout:.0f} s")
        if code != 0:
            raise AudioError(self.path, "corrupt", f"ffmpeg failed: {err[-300:]}")


def iter_blocks(path: str | Path, info: AudioInfo | None = None, block_seconds: float = BLOCK_SECONDS):
    """Yield (mono float32 block, sample_rate) from the start of a file, in its own rate."""
    path = Path(path)
    info = info or probe(path)
    if info.decoder == "soundfile":
        block = max(1, int(block_seconds * info.sample_rate))
        try:
            with sf.SoundFile(os.fsencode(path)) as f:
                for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                    yield data.mean(axis=1), info.sample_rate
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(path, "corrupt", f"decoding failed: {e}") from e
        return
    ff = _Ffmpeg(path, info.sample_rate, 1, decode_timeout(info.duration))
    nbytes = int(block_seconds * info.sample_rate) * 4
    # A decoder that keeps going well past the declared length is looping (or the header lies).
    limit = (info.duration * 1.5 + 60.0) * info.sample_rate * 4 if info.duration > 0 else None
    total = 0
    assert ff.proc.stdout is not None
    try:
        while True:
            buf = ff.proc.stdout.read(nbytes)
            if not buf:
                break
            total += len(buf)
            if limit is not None and total > limit:
                raise AudioError(path, "corrupt", f"ffmpeg decoded more than 1.5x the declared {info.duration:.1f} s")
            yield np.frombuffer(buf[: len(buf) // 4 * 4], dtype=np.float32), info.sample_rate
    except BaseException:
        ff.kill()
        try:
            ff.finish()
        except AudioError:
            pass
        raise
    ff.finish()


def decode_to_wav(path: str | Path, out_path: str | Path, info: AudioInfo | None = None,
                  sample_rate: int = ANALYSIS_SR) -> int:
    """Decode any supported file to a mono PCM-16 wav at ``sample_rate``; return its frame count.

    Memory stays at one block whatever the file length. The output appears atomically."""
    path, out_path = Path(path), Path(out_path)
    info = info or probe(path)
    frames = 0

    def write(tmp: Path) -> None:
        nonlocal frames
        resampler = None
        bad, first_bad = 0, None
        decoded = 0  # samples at the source rate
        with sf.SoundFile(str(tmp), "w", samplerate=sample_rate, channels=1, subtype="PCM_16", format="WAV") as out:
            for block, sr in iter_blocks(path, info):
                finite = np.isfinite(block)
                if not finite.all():
                    if first_bad is None:
                        first_bad = (decoded + int(np.argmin(finite))) / sr
                    bad += int(block.size - finite.sum())
                    block = sanitize(block)
                decoded += len(block)
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
        # Checked before the file appears: a bad decode leaves no cache file behind.
        if bad:
            raise AudioError(path, "non_finite", f"{bad} NaN/inf samples (the first at {first_bad:.3f} s)")
        if info.decoder == "soundfile" and info.format in ("FLAC", "AIFF", "CAF", "W64", "WAV", "WAVEX"):
            expected = info.frames * sample_rate / info.sample_rate
            if frames + 0.01 * sample_rate < expected * 0.995:
                raise AudioError(path, "truncated",
                                 f"decoded {frames / sample_rate:.2f} s of the {info.duration:.2f} s the header declares")

    atomic_write(out_path, write)
    return frames


def sanitize(x: np.ndarray) -> np.ndarray:
    """NaN -> 0 and +-inf -> +-1, then clipped to [-1, 1]: what every audio writer gets (a NaN
    passed to an encoder can abort the whole worker process)."""
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def read_span(path: str | Path, start: float = 0.0, end: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of [start, end) seconds of a file libsndfile can seek in."""
    with sf.SoundFile(os.fsencode(path)) as f:
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
    ff = _Ffmpeg(path, sample_rate, 1, decode_timeout(end - start), start=start, duration=end - start)
    assert ff.proc.stdout is not None
    try:
        out = ff.proc.stdout.read()
    finally:
        ff.finish()
    return np.frombuffer(out[: len(out) // 4 * 4], dtype=np.float32).copy()
