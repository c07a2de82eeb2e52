"""Throughput of filters.dnsmos.DNSMOS against speechmos.dnsmos.run on dialogue-like clips.

A few minutes of espeak-ng speech (several voices) are cut into 5-30 s clips; both scorers
score every clip after a warm-up. Prints audio seconds per wall second for each, the speed
ratio and the largest score difference.

    .venv/bin/python benchmarks/bench_dnsmos.py [--minutes 3] [--threads N] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from filters.dnsmos import DNSMOS, SR, tile_to_window, window_starts  # noqa: E402

SENTENCES = [
    "Did you see the match last night? It went to extra time and nobody could believe the ending.",
    "I think we should leave early tomorrow, because the roads are going to be busy after nine.",
    "The library closes at six, so if you need those books you had better hurry up.",
    "My sister moved to the coast last year and she says she will never live in a city again.",
    "Could you send me the figures before the meeting? I want to check the totals first.",
    "We planted tomatoes, beans and a few rows of lettuce, but the rabbits ate most of it.",
]
VOICES = ["en-us+f3", "en-us+m3", "en-us+f2", "en-us+m1"]


def make_speech(seconds: float) -> np.ndarray:
    parts, total, i = [], 0.0, 0
    with tempfile.TemporaryDirectory() as d:
        while total < seconds:
            path = Path(d) / f"{i}.wav"
            text = SENTENCES[i % len(SENTENCES)]
            subprocess.run(["espeak-ng", "-v", VOICES[i % len(VOICES)], "-w", str(path), text],
                           check=True)
            x, sr = sf.read(path, dtype="float32")
            x = np.clip(soxr.resample(x, sr, SR), -1, 1).astype(np.float32)
            parts += [x, np.zeros(int(0.3 * SR), np.float32)]
            total += len(x) / SR + 0.3
            i += 1
    return np.concatenate(parts)


def cut_clips(audio: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    clips, pos = [], 0
    while pos + 5 * SR <= len(audio):
        n = int(rng.uniform(5, 30) * SR)
        clips.append(audio[pos: pos + n])
        pos += n
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from speechmos import dnsmos as speechmos_dnsmos

    clips = cut_clips(make_speech(args.minutes * 60), np.random.default_rng(args.seed))
    seconds = sum(len(c) for c in clips) / SR
    windows = sum(len(window_starts(len(tile_to_window(c)))) for c in clips)
    print(f"clips: {len(clips)} of 5-30 s, {seconds:.1f} s of audio, {windows} DNSMOS windows")

    ours = DNSMOS(num_threads=args.threads, batch_size=args.batch_size)
    warm = clips[0][: 6 * SR]
    ours.score(warm)
    speechmos_dnsmos.run(warm, SR)

    t = time.perf_counter()
    got = ours.score_batch(clips)
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    ref = [speechmos_dnsmos.run(c, SR) for c in clips]
    t_ref = time.perf_counter() - t

    diff = max(abs(g[k] - r[f"{k}_mos"]) for g, r in zip(got, ref) for k in ("ovrl", "sig", "bak"))
    print(f"filters.dnsmos.DNSMOS.score_batch: {t_ours:7.2f} s wall, "
          f"{seconds / t_ours:7.1f} audio s / wall s")
    print(f"speechmos.dnsmos.run (per clip):   {t_ref:7.2f} s wall, "
          f"{seconds / t_ref:7.1f} audio s / wall s")
    print(f"speed ratio: {t_ref / t_ours:.2f}x; max |score difference| (OVRL/SIG/BAK): {diff:.2e}")


if __name__ == "__main__":
    main()
