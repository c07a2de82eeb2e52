"""Bounded memory: an hour-long file, and tens of thousands of small files, through the runner.

    python benchmarks/bench_scale.py [--hours 1.0] [--files 20000]

Runs ingest -> VAD (the stages that touch whole files) and prints the peak resident memory
(VmHWM from /proc) of the driver and of every Ray worker, next to the size the decoded audio
would take in memory. A short file is run first as the baseline: with bounded memory the peaks
do not grow with the file's length or with the number of files.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402


def worker_peaks_mb() -> list[float]:
    """Peak RSS of the live Ray worker processes of this session (Linux /proc)."""
    peaks = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"default_worker.py" not in cmd and not cmd.startswith(b"ray::"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peaks


def run(src: Path, out: Path, label: str, audio_seconds: float) -> None:
    import ray

    from pipeline.config import parse_config
    from pipeline.runner import run_pipeline

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = parse_config({
            "run": {"output": str(out), "progress": False, "report": {"enabled": False}},
            "stages": {"ingest": {"resources": {"batch_size": 16, "concurrency": [1, 2]}},
                       "vad": {"resources": {"batch_size": 16, "concurrency": 1}}},
        })
        t = time.perf_counter()
        res = run_pipeline(cfg, src)
        wall = time.perf_counter() - t
        peaks = worker_peaks_mb()
    finally:
        ray.shutdown()
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak: runs grow it
    decoded_mb = audio_seconds * 16000 * 4 / 2**20
    print(f"{label}: {res.num_inputs} files, {audio_seconds / 3600:.2f} h in {wall:.0f} s "
          f"({audio_seconds / wall:.0f} audio s / wall s, {res.num_inputs / wall:.1f} files/s)")
    print(f"    peak RSS: driver {driver:.0f} MB, largest Ray worker {max(peaks, default=0):.0f} MB "
          f"({len(peaks)} workers); the decoded audio would be {decoded_mb:.0f} MB in float32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=20000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        for label, seconds in (("baseline, one 2-minute file", 120.0), (f"one {args.hours:g}-hour file", args.hours * 3600)):
            d = work / label.split(",")[0].replace(" ", "_")
            d.mkdir()
            # Generated in a child process, so this process's peak RSS is the driver's alone.
            # MP3: the decoder has to stream a compressed file, the common case in the wild.
            subprocess.run([sys.executable, "-m", "tools.synth", "long", "--duration", str(seconds),
                            "--seed", "7", "--out", str(d / "long.mp3"), "--truth", str(work / f"{d.name}.json")],
                           check=True, cwd=Path(__file__).resolve().parent.parent)
            run(d, work / f"out_{d.name}", label, seconds)
        many = work / "many"
        many.mkdir()
        rng = np.random.default_rng(0)
        tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000) + 0.01 * rng.standard_normal(8000)).astype(np.float32)
        for i in range(args.files):
            sub = many / f"{i // 1000:03d}"
            sub.mkdir(exist_ok=True)
            sf.write(sub / f"f{i:06d}.wav", tone, 16000)
        run(many, work / "out_many", f"{args.files} files of 0.5 s", args.files * 0.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
