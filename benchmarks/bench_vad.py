"""VAD throughput: the VAD stage through the runner vs a plain single-process silero loop.

    python benchmarks/bench_vad.py [--hours 1.0] [--workers 2]

Both sides read the same decoded 16 kHz files. The runner figure excludes Ray start-up and the
ingest stage (done in a first, untimed run); it includes everything else the runner does
(planning, Ray Data scheduling, writing manifests, compaction, the ledger).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import soundfile as sf  # noqa: E402


def make_audio(folder: Path, hours: float, files: int) -> float:
    from tools import synth

    per_file = hours * 3600 / files
    total = 0.0
    for i in range(files):
        clip = synth.synth_long(per_file, seed=1000 + i, kind="dialogue", text_pool=60)
        sf.write(folder / f"long{i:02d}.wav", clip.audio, clip.sample_rate, subtype="PCM_16")
        total += len(clip.audio) / clip.sample_rate
    return total


def plain_loop(paths: list[Path]) -> float:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    torch.set_num_threads(1)
    model = load_silero_vad(onnx=True)
    t0 = time.perf_counter()
    for p in paths:
        x, sr = sf.read(p, dtype="float32")
        get_speech_timestamps(torch.from_numpy(x), model, sampling_rate=sr)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()

    import ray

    from pipeline.config import parse_config
    from pipeline.runner import run_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_vad_"))
    try:
        src = work / "in"
        src.mkdir()
        t = time.perf_counter()
        audio_s = make_audio(src, args.hours, args.files)
        print(f"generated {audio_s / 3600:.2f} h of dialogue in {args.files} files ({time.perf_counter() - t:.0f} s)")

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        run = {"output": str(work / "out"), "progress": False, "report": {"enabled": False}}
        ingest = {"resources": {"batch_size": 1, "concurrency": [1, args.workers]}}
        run_pipeline(parse_config({"run": run, "stages": {"ingest": ingest}}), src)
        vad = {"resources": {"batch_size": args.batch, "concurrency": args.workers}}
        cfg = parse_config({"run": run, "stages": {"ingest": ingest, "vad": vad}})
        t = time.perf_counter()
        res = run_pipeline(cfg, src)
        runner_s = time.perf_counter() - t
        assert res.processed == args.files
        ray.shutdown()

        cached = sorted((work / "out" / "cache" / "audio16k").glob("*.wav"))
        loop_s = plain_loop(cached)
        r_runner, r_loop = audio_s / runner_s, audio_s / loop_s
        print(f"VAD through the runner ({args.workers} workers, batch {args.batch}): "
              f"{runner_s:.1f} s wall, {r_runner:.0f} audio s / wall s")
        print(f"plain silero loop (get_speech_timestamps, 1 process):      "
              f"{loop_s:.1f} s wall, {r_loop:.0f} audio s / wall s")
        print(f"ratio runner / plain loop: {r_runner / r_loop:.2f}x (target >= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
