"""Diarization benchmark on generated audio with exact truth (pipeline/synth.py).

Prints, for the embedded backend: DER (pyannote.metrics, no collar, overlap scored) per condition
(clean dialogues, dialogues with back-channels and overlaps, dialogues in white noise at 10 dB
SNR), speaker-count accuracy on dialogues, monologues and 3-speaker meetings, and the real-time
factor on this machine's CPU. Speech spans come from the real VAD stage (silero), so the DER
includes VAD errors, as in the pipeline.

For the pyannote backend it builds a pipeline directory with random weights at the real model
sizes (PyanNet segmentation, WeSpeaker ResNet34 embedding, a PLDA from random arrays) and prints
its real-time factor on CUDA when available, else on CPU. Random weights say nothing about
accuracy: only the speed is meaningful.

    .venv/bin/python benchmarks/bench_diarization.py [--n 8] [--duration 40] [--no-pyannote]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from pipeline.backends.diarization import diarization_error, row_fields  # noqa: E402
from pipeline.backends.diarization.embedded import EmbeddedDiarizer, EmbeddedSettings  # noqa: E402
from pipeline.stages.vad import SileroOnnx, VadConfig, speech_spans  # noqa: E402
from pipeline.synth import synth_dialogue, synth_meeting, synth_monologue, write_clip  # noqa: E402

CONDITIONS = {
    "clean": lambda seed, d: synth_dialogue(seed, duration=d),
    "backchannel": lambda seed, d: synth_dialogue(seed, duration=d, backchannel_prob=0.6, overlap_prob=0.2),
    "noise_10dB": lambda seed, d: synth_dialogue(seed, duration=d, noise_snr_db=10.0),
    "monologue": lambda seed, d: synth_monologue(seed, duration=d),
    "meeting3": lambda seed, d: synth_meeting(seed, duration=d, n_speakers=3),
}


def der(truth, turns: list[dict]) -> tuple[float, float, float, float]:
    """(DER, missed, false alarm, confusion) as fractions of the reference speech."""
    e = diarization_error([(t.start, t.end, t.speaker) for t in truth.turns],
                          [(t["start"], t["end"], t["speaker"]) for t in turns], truth.duration)
    return e["der"], e["missed"], e["false_alarm"], e["confusion"]


def make_set(kind: str, n: int, duration: float, out: Path, seed0: int = 1000):
    items = []
    for i in range(n):
        clip = CONDITIONS[kind](seed0 + i, duration)
        path = out / f"{kind}_{i}.wav"
        write_clip(clip, path)
        items.append((path, clip.truth))
    return items


def run_embedded(sets: dict, settings: EmbeddedSettings) -> None:
    vad = SileroOnnx()
    vad_cfg = VadConfig()
    diarizer = EmbeddedDiarizer(settings)
    path, truth = next(iter(sets.values()))[0]  # warm-up: lazy imports, first allocations
    diarizer.diarize(str(path), [(0.0, truth.duration)], truth.duration)
    print(f"\nembedded backend ({settings.model_dump()})")
    print(f"{'condition':12s} {'files':>5s} {'DER%':>6s} {'miss%':>6s} {'FA%':>6s} {'conf%':>6s} "
          f"{'spk ok':>7s} {'RTF':>7s}  per-file DER% (found/true speakers)")
    for kind, items in sets.items():
        scores, right, secs, audio = [], 0, 0.0, 0.0
        details = []
        for path, truth in items:
            prob = vad.probabilities([str(path)])[0]
            speech = speech_spans(prob, truth.duration, vad_cfg)
            t0 = time.perf_counter()
            fields = row_fields(diarizer.diarize(str(path), speech, truth.duration, 1, 4))
            secs += time.perf_counter() - t0
            audio += truth.duration
            s = der(truth, fields["turns"])
            scores.append(s)
            right += fields["num_speakers"] == len(truth.speakers)
            details.append(f"{100 * s[0]:.1f}({fields['num_speakers']}/{len(truth.speakers)})")
        m = np.mean(scores, axis=0) * 100
        print(f"{kind:12s} {len(items):5d} {m[0]:6.2f} {m[1]:6.2f} {m[2]:6.2f} {m[3]:6.2f} "
              f"{right:3d}/{len(items):<3d} {secs / audio:7.4f}  {' '.join(details)}")


def run_long(out: Path, seconds: float, settings: EmbeddedSettings) -> None:
    """One long dialogue (sentences reused from a pool): speed and memory path of long inputs."""
    from pipeline.synth import synth_long

    clip = synth_long(seconds, seed=11, kind="dialogue", backchannel_prob=0.3, overlap_prob=0.1)
    path = out / "long_embedded.wav"
    write_clip(clip, path)
    vad = SileroOnnx()
    t0 = time.perf_counter()
    speech = speech_spans(vad.probabilities([str(path)])[0], clip.truth.duration, VadConfig())
    t_vad = time.perf_counter() - t0
    diarizer = EmbeddedDiarizer(settings)
    t0 = time.perf_counter()
    fields = row_fields(diarizer.diarize(str(path), speech, clip.truth.duration, 1, 4))
    secs = time.perf_counter() - t0
    d = der(clip.truth, fields["turns"])
    print(f"long dialogue {clip.truth.duration:.0f} s: embedded diarization {secs:.1f} s, RTF {secs / clip.truth.duration:.4f} "
          f"(VAD {t_vad / clip.truth.duration:.4f}); DER {100 * d[0]:.2f}%, {fields['num_speakers']} speakers")


def run_pyannote(out: Path, seconds: float | None) -> None:
    import torch

    from pipeline.backends.diarization.pyannote import PyannoteDiarizer, PyannoteSettings, write_random_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seconds = seconds or (300.0 if device == "cuda" else 30.0)
    pdir = write_random_pipeline(out / "pyannote_random", size="full")
    clip = synth_long_dialogue(seconds)
    path = out / "long.wav"
    write_clip(clip, path)
    d = PyannoteDiarizer(PyannoteSettings(model=str(pdir), batch_size=32), device=device,
                         num_threads=torch.get_num_threads())
    d.diarize(str(path), [], min(clip.truth.duration, 30.0))  # warm-up (CUDA kernels, first allocations)
    t0 = time.perf_counter()
    res = d.diarize(str(path), [], clip.truth.duration)
    secs = time.perf_counter() - t0
    print(f"\npyannote backend, random weights at real sizes (PyanNet + WeSpeaker ResNet34), {device}: "
          f"{clip.truth.duration:.0f} s of audio in {secs:.2f} s, RTF {secs / clip.truth.duration:.4f} "
          f"({len(res.turns)} turns from random weights)")
    if device == "cpu":
        print("CUDA is not available here: no GPU real-time factor measured.")


def synth_long_dialogue(seconds: float):
    from pipeline.synth import synth_long

    return synth_long(seconds, seed=7, kind="dialogue")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="files per condition")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per file")
    p.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="embedded settings, e.g. threshold=0.9")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first file of each condition")
    p.add_argument("--long-seconds", type=float, default=600.0, help="length of the long-file run (0: skip)")
    p.add_argument("--no-pyannote", action="store_true")
    p.add_argument("--pyannote-seconds", type=float, default=None,
                   help="audio for the pyannote timing (default 300 s on CUDA, 30 s on CPU)")
    a = p.parse_args()
    settings = EmbeddedSettings(**dict(kv.split("=", 1) for kv in a.set))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sets = {k: make_set(k, a.n, a.duration, out, a.seed) for k in a.conditions}
        run_embedded(sets, settings)
        if a.long_seconds:
            run_long(out, a.long_seconds, settings)
        if not a.no_pyannote:
            run_pyannote(out, a.pyannote_seconds)


if __name__ == "__main__":
    main()
