"""ASR figures: WER on generated dialogues, and real-time factors of every backend.

    .venv/bin/python benchmarks/bench_asr.py                 # WER + CPU RTFs (+ GPU RTFs with CUDA)
    .venv/bin/python benchmarks/bench_asr.py --dialogues 5 --cpu-size small --skip-gpu

* WER: the ASR stage on generated English dialogues, given the true turns (oracle diarization),
  against the generator's text; jiwer, lowercase, without punctuation, pooled over all dialogues.
  Two settings: the default (faster-whisper with the bundled real Whisper tiny.en weights, word
  attribution) and pocketsphinx per turn. For the default also the share of recognised words that
  got the right speaker. Real recorded speech: benchmarks/bench_real.py.
* RTF = wall time / audio seconds, after one warm-up call. faster-whisper tiny.en and pocketsphinx
  are real. The other hub-backed backends run on RANDOM weights built here at a real model's
  dimensions (no hub is reachable): speed only, and since random weights never stop on their own,
  decoding is capped at ``--tokens-per-second`` x item length tokens (about English speech's token
  rate), which is what a trained model emits on speech.
* GPU (when CUDA is available): faster-whisper tiny.en batched in float16, and the Whisper
  backends at large-v3 dimensions, fp16, batched.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline.backends.asr import load_backend  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.stages.asr import AsrConfig, AsrStage  # noqa: E402
from tools import synth  # noqa: E402

SR = 16000
# openai-whisper sizes: n_mels, width, heads, layers, vocabulary
WHISPER_DIMS = {"tiny": (80, 384, 6, 4, 51865), "base": (80, 512, 8, 6, 51865), "small": (80, 768, 12, 12, 51865),
                "medium": (80, 1024, 16, 24, 51865), "large-v3": (128, 1280, 20, 32, 51866)}
# Paraformer-large (paraformer-zh): width, heads, ffn, encoder blocks, decoder blocks, vocabulary
PARAFORMER_DIMS = {"tiny": (32, 2, 64, 1, 1, 20), "large": (512, 4, 2048, 50, 16, 8404)}


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def wer_section(n: int, seed0: int, work: Path, label: str, config: dict) -> None:
    import difflib

    import jiwer

    print(f"== {label}: WER on {n} generated English dialogues (true turns, clean speech) ==")
    stage = AsrStage(AsrConfig(**config), StageContext("asr", work, num_cpus=2))
    refs, hyps, audio_s, wall = [], [], 0.0, 0.0
    right = matched = 0
    print(f"{'dialogue':>8} {'voices':>20} {'seconds':>8} {'words':>6} {'WER':>6} {'RTF':>6} {'speaker':>7}")
    for k in range(n):
        clip = synth.synth_dialogue(seed0 + k, n_turns=8, backchannel_prob=0.3)
        path = work / f"dlg{k}.wav"
        synth.write_clip(clip, path)
        tr = clip.truth
        turns = sorted(tr.turns, key=lambda t: t.start)
        row = {"recording_id": f"dlg{k}", "audio_path": str(path), "duration": tr.duration, "status": "ok",
               "speech": [{"start": t.start, "end": t.end} for t in turns],
               "turns": [{"start": t.start, "end": t.end, "speaker": t.speaker} for t in turns]}
        t0 = time.perf_counter()
        out = stage.process([row])[0]
        dt = time.perf_counter() - t0
        ref_w = [(w, t.speaker) for t in turns for w in norm(t.text).split()]
        hyp_w = [(w, u["speaker"]) for u in out["utterances"] for w in norm(u["text"]).split()]
        sm = difflib.SequenceMatcher(a=[w for w, _ in ref_w], b=[w for w, _ in hyp_w], autojunk=False)
        pairs = [(ref_w[i + j][1], hyp_w[h + j][1]) for i, h, m in sm.get_matching_blocks() for j in range(m)]
        right += sum(a == b for a, b in pairs)
        matched += len(pairs)
        ref, hyp = " ".join(w for w, _ in ref_w), " ".join(w for w, _ in hyp_w)
        refs.append(ref)
        hyps.append(hyp)
        audio_s += tr.duration
        wall += dt
        voices = "/".join(v["voice"] for v in tr.speakers.values())
        spk = sum(a == b for a, b in pairs) / max(1, len(pairs))
        print(f"{k:>8} {voices:>20} {tr.duration:8.1f} {len(ref.split()):6d} {jiwer.wer(ref, hyp):6.3f} "
              f"{dt / tr.duration:6.2f} {spk:7.3f}")
    print(f"pooled WER {jiwer.wer(refs, hyps):.3f} over {sum(len(r.split()) for r in refs)} words; "
          f"RTF {wall / audio_s:.2f} ({audio_s:.0f} s of audio); right speaker for {right}/{matched} "
          f"recognised words ({right / max(1, matched):.3f})")
    print(f"example  ref: {refs[0][:110]}\n         hyp: {hyps[0][:110]}\n")


def speech_items(n: int, seconds: float) -> list[np.ndarray]:
    clip = synth.synth_long(n * seconds + 5, seed=7, kind="monologue", text_pool=20)
    step = int(seconds * SR)
    return [np.ascontiguousarray(clip.audio[i * step:(i + 1) * step]) for i in range(n)]


def build(kind: str, size: str, work: Path) -> str:
    from test_asr import make_hf_whisper_dir, make_paraformer_dir, make_whisper_checkpoint

    if kind == "whisper":
        n_mels, width, heads, layers, vocab = WHISPER_DIMS[size]
        return str(make_whisper_checkpoint(work / f"whisper-{size}.pt", n_mels=n_mels, n_state=width,
                                           n_head=heads, n_layer=layers, n_vocab=vocab, half=width >= 1024))
    if kind == "hf-whisper":
        n_mels, width, heads, layers, vocab = WHISPER_DIMS[size]
        return str(make_hf_whisper_dir(work / f"hf-whisper-{size}", d_model=width, layers=layers, heads=heads,
                                       ffn=4 * width, num_mel_bins=n_mels, vocab_size=vocab, half=width >= 1024))
    width, heads, ffn, enc, dec, vocab = PARAFORMER_DIMS[size]
    chars = [chr(0x4E00 + i) for i in range(vocab - 4)]
    return str(make_paraformer_dir(work / f"paraformer-{size}", d_model=width, heads=heads, ffn=ffn,
                                   encoder_blocks=enc, decoder_blocks=dec, chars=chars))


def rtf(name: str, options: dict, items: list[np.ndarray], device: str, threads: int) -> tuple[float, float]:
    asr = load_backend(name, options, device=device, num_threads=threads)
    asr.transcribe(items[:1], language="en")  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    asr.transcribe(items, language="en")
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    audio = sum(len(x) for x in items) / SR
    del asr
    return wall, audio


def rtf_section(title: str, runs: list[tuple], items: list[np.ndarray], device: str, threads: int, work: Path) -> None:
    print(f"== {title} ==")
    print(f"{'backend':<14} {'model':<34} {'weights':<8} {'items':>5} {'audio_s':>8} {'wall_s':>8} {'RTF':>7}")
    for name, label, weights, options in runs:
        try:
            wall, audio = rtf(name, options(work) if callable(options) else options, items, device, threads)
            print(f"{name:<14} {label:<34} {weights:<8} {len(items):5d} {audio:8.1f} {wall:8.2f} {wall / audio:7.3f}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one backend failing must not hide the others' figures
            print(f"{name:<14} {label:<34} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", type=int, default=3)
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--cpu-size", default="base", choices=list(WHISPER_DIMS), help="Whisper dims on CPU")
    ap.add_argument("--cpu-paraformer", default="large", choices=list(PARAFORMER_DIMS))
    ap.add_argument("--cpu-items", type=int, default=4, help="10 s items per CPU run")
    ap.add_argument("--gpu-items", type=int, default=64, help="10 s items per GPU run")
    ap.add_argument("--tokens-per-second", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-wer", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    item_s = 10.0
    cap = max(1, int(round(args.tokens_per_second * item_s)))
    # Other jobs on the machine slow every figure: say how busy it was.
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if not args.skip_wer:
            wer_section(args.dialogues, args.seed, work, "faster-whisper tiny.en (bundled), word attribution", {})
            wer_section(args.dialogues, args.seed, work, "pocketsphinx, per turn",
                        {"backends": {"default": "pocketsphinx"}, "attribution": "turns"})
        if not args.skip_cpu:
            items = speech_items(args.cpu_items, item_s)
            size, psize = args.cpu_size, args.cpu_paraformer
            runs = [
                ("faster-whisper", "tiny.en (bundled), int8", "real", {}),
                ("faster-whisper", "tiny.en (bundled), int8, batch 4", "real", {"batch_size": 4}),
                ("pocketsphinx", "en-us (ships in the package)", "real", {}),
                ("whisper", f"{size} dims", "random",
                 lambda w: {"model": build("whisper", size, w), "batch_size": 4, "max_new_tokens": cap}),
                ("hf-whisper", f"{size} dims", "random",
                 lambda w: {"model": build("hf-whisper", size, w), "batch_size": 4, "max_new_tokens": cap}),
                ("funasr", f"paraformer-{psize} dims", "random",
                 lambda w: {"model": build("funasr", psize, w)}),
            ]
            rtf_section(f"CPU real-time factor ({args.threads} threads, {item_s:.0f} s items, "
                        f"whisper decoding capped at {cap} tokens/item)", runs, items, "cpu", args.threads, work)
        if args.skip_gpu:
            pass
        elif not torch.cuda.is_available():
            print("== GPU real-time factor ==\nCUDA not available on this machine: not measured.\n")
        else:
            items = speech_items(args.gpu_items, item_s)
            runs = [
                ("faster-whisper", "tiny.en (bundled), fp16, batch 16", "real", {"batch_size": 16}),
                ("whisper", "large-v3 dims, fp16, batch 16", "random",
                 lambda w: {"model": build("whisper", "large-v3", w), "batch_size": 16, "max_new_tokens": cap}),
                ("hf-whisper", "large-v3 dims, fp16, batch 16", "random",
                 lambda w: {"model": build("hf-whisper", "large-v3", w), "batch_size": 16, "max_new_tokens": cap}),
                ("funasr", "paraformer-large dims", "random", lambda w: {"model": build("funasr", "large", w)}),
            ]
            rtf_section(f"GPU real-time factor ({torch.cuda.get_device_name(0)}, {item_s:.0f} s items, "
                        f"decoding capped at {cap} tokens/item)", runs, items, "cuda", args.threads, work)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
