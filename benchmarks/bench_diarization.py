"""Diarization benchmark: real recordings and generated audio with exact truth.

Prints, for each offline backend (``powerset``: pyannote segmentation-3.0 + CAM++, the local
profile's default; ``embedded``: resemblyzer), one line per real recording and one per generated condition:
DER (pyannote.metrics, no collar, overlapped speech scored) split into missed speech, false alarm
and speaker confusion, the number of speakers found vs the true number, and the real-time factor
on this machine's CPU. Speech spans come from the real VAD stage (silero) run on the 16 kHz
analysis copy the ingest stage makes (an 8 kHz file is upsampled, as in the pipeline), so the DER
includes VAD errors, as in the pipeline.

Real recordings: every `*_<N>spk_*` file of `../shared/realspeech/` (true count from the name,
reference turns from a `.rttm` beside it when there is one) and pyannote.audio's packaged
`sample.wav` + `sample.rttm`. Without a reference only the speaker count is scored.

Generated conditions (tools/synth.py, espeak voices): clean dialogues, back-channels and
overlapped turn changes, white noise at 10 dB SNR, one speaker 12 dB quieter, telephone band
(written at 8 kHz, upsampled by the ingest), monologues, 3- and 4-speaker meetings.

For the pyannote backend it builds a pipeline directory with random weights at the real model
sizes (PyanNet segmentation, WeSpeaker ResNet34 embedding, a PLDA from random arrays) and prints
its real-time factor on CUDA when available, else on CPU. The real pyannote weights come from the
hub, which is unreachable here: random weights say nothing about accuracy, only the speed is
meaningful, so pyannote's DER on the real recordings is not measured.

    .venv/bin/python benchmarks/bench_diarization.py [--backends powerset embedded] [--n 6] [--duration 30] [--no-pyannote]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

from pipeline.audio import decode_to_wav  # noqa: E402
from pipeline.backends.diarization import BACKENDS, row_fields  # noqa: E402
from pipeline.backends.diarization.embedded import (_disjoint,  # noqa: E402
                                                    partition, separation)
from pipeline.backends.vad.silero import SileroVad  # noqa: E402
from pipeline.stages.vad import VadConfig, speech_spans  # noqa: E402
from tools.scoring import diarization_error  # noqa: E402
from tools.synth import Clip, synth_dialogue, synth_meeting, synth_monologue, write_clip  # noqa: E402

REALSPEECH = ROOT.parent / "shared" / "realspeech"


def quieter(clip: Clip, speaker: str, db: float) -> Clip:
    """The same clip with one speaker ``db`` quieter (needs the stems)."""
    gain = np.float32(10 ** (-db / 20))
    audio = clip.audio - clip.stems[speaker] * (1 - gain)
    return Clip(audio, clip.truth, None)


CONDITIONS = {  # name -> (clip maker, sample rate written)
    "clean": (lambda seed, d: synth_dialogue(seed, duration=d), None),
    "backchannel": (lambda seed, d: synth_dialogue(seed, duration=d, backchannel_prob=0.6, overlap_prob=0.2), None),
    "noise_10dB": (lambda seed, d: synth_dialogue(seed, duration=d, noise_snr_db=10.0), None),
    "quiet_12dB": (lambda seed, d: quieter(synth_dialogue(seed, duration=d, keep_stems=True), "S2", 12.0), None),
    "phone_8k": (lambda seed, d: synth_dialogue(seed, duration=d), 8000),
    "monologue": (lambda seed, d: synth_monologue(seed, duration=d), None),
    "meeting3": (lambda seed, d: synth_meeting(seed, duration=d, n_speakers=3), None),
    "meeting4": (lambda seed, d: synth_meeting(seed, duration=d * 1.5, n_speakers=4), None),
}


def read_rttm(path: Path) -> list[tuple[float, float, str]]:
    turns = []
    for line in path.read_text().splitlines():
        f = line.split()
        if f and f[0] == "SPEAKER":
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return turns


def real_items(out: Path) -> list[dict]:
    """Real recordings as analysis copies: name, path, duration, true count, reference or None."""
    import soundfile as sf

    sources = []
    for p in sorted(REALSPEECH.glob("*.wav")):
        m = re.search(r"_(\d+)spk_", p.name)
        if m:
            rttm = p.with_suffix(".rttm")
            sources.append((p, int(m.group(1)), read_rttm(rttm) if rttm.exists() else None))
    try:
        import pyannote.audio

        sample = Path(pyannote.audio.__file__).parent / "sample"
        sources.append((sample / "sample.wav", 2, read_rttm(sample / "sample.rttm")))
    except ImportError:
        pass
    items = []
    for p, n, ref in sources:
        copy = out / f"real_{p.stem}.wav"
        decode_to_wav(p, copy)
        items.append(dict(name=p.stem, path=copy, duration=sf.info(str(copy)).duration, speakers=n, ref=ref))
    return items


def generated_items(kind: str, n: int, duration: float, out: Path, seed0: int) -> list[dict]:
    make, rate = CONDITIONS[kind]
    items = []
    for i in range(n):
        clip = make(seed0 + i, duration)
        path = out / f"{kind}_{i}.wav"
        write_clip(clip, path, target_sr=rate)
        if rate:  # the pipeline diarizes the ingest's 16 kHz copy
            decode_to_wav(path, out / f"{kind}_{i}.16k.wav")
            path = out / f"{kind}_{i}.16k.wav"
        t = clip.truth
        items.append(dict(name=f"{kind}_{i}", path=path, duration=t.duration, speakers=len(t.speakers),
                          ref=[(x.start, x.end, x.speaker) for x in t.turns]))
    return items


class Runner:
    def __init__(self, backend: str, settings):
        self.backend = backend
        self.vad = SileroVad()
        self.diarizer = BACKENDS.build(backend, settings, device="cpu", num_threads=1)

    def __call__(self, item: dict) -> dict:
        speech = speech_spans(self.vad.probabilities([str(item["path"])])[0], item["duration"], VadConfig(), self.vad.hop)
        t0 = time.perf_counter()
        fields = row_fields(self.diarizer.diarize(str(item["path"]), speech, item["duration"], 1, 4))
        secs = time.perf_counter() - t0
        hyp = [(t["start"], t["end"], t["speaker"]) for t in fields["turns"]]
        err = diarization_error(item["ref"], hyp, item["duration"]) if item["ref"] is not None else None
        return dict(err=err, found=fields["num_speakers"], secs=secs, fields=fields, speech=speech)

    def separations(self, item: dict, speech: list, max_k: int = 4) -> str:
        """The embedded count decision's evidence: for K = 2..max_k, the largest separation between
        two of the K groups and the seconds in the smallest group (K is kept while the separation
        is below the threshold and the group holds min_speaker seconds)."""
        if self.backend != "embedded":
            return ""
        d = self.diarizer
        spans = sorted((max(0.0, a), min(item["duration"], b)) for a, b in speech)
        emb, index = d.embed(str(item["path"]), spans)
        size = round(d.s.window / 0.01)
        rows = np.flatnonzero(np.array([(f1 - f0) / size for _, f0, f1 in index]) >= 0.5)
        x = emb[rows].astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out = []
        for k in range(2, min(max_k, len(x)) + 1):
            labels = partition(x, k)
            if labels.max() + 1 < k:
                break
            sep = separation(x @ x.T, _disjoint(index, rows), labels).max()
            out.append(f"K{k} {sep:.3f}/{np.bincount(labels).min() * d.s.hop:.1f}s")
        return " ".join(out)


HEADER = (f"{'':34s} {'DER%':>6s} {'miss%':>6s} {'FA%':>6s} {'conf%':>6s} {'speakers':>9s} {'RTF':>7s}")


def _row(name: str, errs: list, found: str, secs: float, audio: float, extra: str = "") -> str:
    if errs:
        m = np.mean([[e["der"], e["missed"], e["false_alarm"], e["confusion"]] for e in errs], axis=0) * 100
        cols = " ".join(f"{v:6.2f}" for v in m)
    else:
        cols = " ".join(f"{'-':>6s}" for _ in range(4))
    return f"{name:34s} {cols} {found:>9s} {secs / audio:7.4f}  {extra}"


def run_real(runner: Runner, items: list[dict]) -> None:
    print(f"\n{runner.backend}: real recordings (speakers: found/true; {runner.diarizer.s.model_dump()})")
    print(HEADER)
    right, two = 0, []
    for it in items:
        r = runner(it)
        right += r["found"] == it["speakers"]
        if r["err"] is not None and it["speakers"] == 2:
            two.append(r["err"]["der"])
        ov = r["fields"]["overlap_ratio"]
        sep = runner.separations(it, r["speech"])
        print(_row(it["name"][:34], [r["err"]] if r["err"] else [], f"{r['found']}/{it['speakers']}",
                   r["secs"], it["duration"], f"overlap ratio {ov:.2f}" + (f"; separation/smallest group: {sep}" if sep else "")))
    print(f"speaker count right on {right}/{len(items)} real recordings; "
          f"mean DER on real 2-speaker recordings with a reference: "
          + (f"{100 * np.mean(two):.2f}% ({len(two)} files)" if two else "none"))


def run_generated(runner: Runner, sets: dict) -> None:
    print(f"\n{runner.backend}: generated conditions (speakers: files with the right count; per-file DER% (found/true))")
    print(HEADER)
    for kind, items in sets.items():
        errs, right, secs, audio, details = [], 0, 0.0, 0.0, []
        for it in items:
            r = runner(it)
            errs.append(r["err"])
            right += r["found"] == it["speakers"]
            secs += r["secs"]
            audio += it["duration"]
            details.append(f"{100 * r['err']['der']:.1f}({r['found']}/{it['speakers']})")
        print(_row(kind, errs, f"{right}/{len(items)}", secs, audio, " ".join(details)))


def run_long(out: Path, seconds: float, backend: str, settings) -> None:
    """One long dialogue (sentences reused from a pool): speed and memory path of long inputs."""
    from tools.synth import synth_long

    clip = synth_long(seconds, seed=11, kind="dialogue", backchannel_prob=0.3, overlap_prob=0.1)
    path = out / "long_embedded.wav"
    write_clip(clip, path)
    vad = SileroVad()
    t0 = time.perf_counter()
    speech = speech_spans(vad.probabilities([str(path)])[0], clip.truth.duration, VadConfig(), vad.hop)
    t_vad = time.perf_counter() - t0
    diarizer = BACKENDS.build(backend, settings, device="cpu", num_threads=1)
    t0 = time.perf_counter()
    fields = row_fields(diarizer.diarize(str(path), speech, clip.truth.duration, 1, 4))
    secs = time.perf_counter() - t0
    d = diarization_error([(t.start, t.end, t.speaker) for t in clip.truth.turns],
                          [(t["start"], t["end"], t["speaker"]) for t in fields["turns"]], clip.truth.duration)
    print(f"\nlong dialogue {clip.truth.duration:.0f} s: {backend} diarization {secs:.1f} s, RTF "
          f"{secs / clip.truth.duration:.4f} (VAD {t_vad / clip.truth.duration:.4f}); DER {100 * d['der']:.2f}%, "
          f"{fields['num_speakers']} speakers")


def run_pyannote(out: Path, seconds: float | None) -> None:
    import torch

    from pipeline.backends.diarization.pyannote import PyannoteDiarizer, PyannoteOptions
    from tools.pyannote_random import write_random_pipeline
    from tools.synth import synth_long

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seconds = seconds or (300.0 if device == "cuda" else 30.0)
    pdir = write_random_pipeline(out / "pyannote_random", size="full")
    clip = synth_long(seconds, seed=7, kind="dialogue")
    path = out / "long.wav"
    write_clip(clip, path)
    torch.set_num_threads(os.cpu_count() or 1)
    d = PyannoteDiarizer(PyannoteOptions(model=str(pdir), batch_size=32), device=device,
                         num_threads=torch.get_num_threads())
    d.diarize(str(path), [], min(clip.truth.duration, 30.0))  # warm-up (CUDA kernels, first allocations)
    t0 = time.perf_counter()
    res = d.diarize(str(path), [], clip.truth.duration)
    secs = time.perf_counter() - t0
    print(f"\npyannote backend, random weights at real sizes (PyanNet + WeSpeaker ResNet34), {device}: "
          f"{clip.truth.duration:.0f} s of audio in {secs:.2f} s, RTF {secs / clip.truth.duration:.4f} "
          f"({len(res.turns)} turns from random weights; its DER is not measured: the real weights "
          f"come from the hub, unreachable here)")
    if device == "cpu":
        print("CUDA is not available here: no GPU real-time factor measured.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=6, help="files per generated condition")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per generated file (meetings of 4: 1.5x)")
    p.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    p.add_argument("--no-real", action="store_true", help="skip the real recordings")
    p.add_argument("--backends", nargs="*", default=["powerset", "embedded"], choices=["powerset", "embedded"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="settings of the first backend listed, e.g. threshold=0.7")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first file of each condition")
    p.add_argument("--long-seconds", type=float, default=600.0, help="length of the long-file run (0: skip)")
    p.add_argument("--no-pyannote", action="store_true")
    p.add_argument("--pyannote-seconds", type=float, default=None,
                   help="audio for the pyannote timing (default 300 s on CUDA, 30 s on CPU)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as in a pipeline worker; also keeps a busy machine from thrashing
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        real = [] if a.no_real else real_items(out)
        sets = {k: generated_items(k, a.n, a.duration, out, a.seed) for k in a.conditions}
        for i, backend in enumerate(a.backends):
            options = BACKENDS.get(backend).Options
            settings = options(**dict(kv.split("=", 1) for kv in a.set)) if i == 0 else options()
            runner = Runner(backend, settings)
            first = (real or next(iter(sets.values())))[0]
            runner(first)  # warm-up: lazy imports, first allocations
            if real:
                run_real(runner, real)
            if sets:
                run_generated(runner, sets)
            if a.long_seconds:
                run_long(out, a.long_seconds, backend, settings)
        if not a.no_pyannote:
            run_pyannote(out, a.pyannote_seconds)


if __name__ == "__main__":
    main()
