"""Size, memory and speed of the reference-size ZipVoice-Dialog (random weights).

    .venv/bin/python benchmarks/bench_model.py [--device cpu|cuda] [--attention explicit|sdpa|both]

Prints: parameter count, peak RSS, the wall time of one training step (forward + backward +
AdamW update) on a batch of 4 utterances of 10 s, and the real-time factor of generating a 10 s
dialogue after a 3 s prompt with 16 Euler steps and CFG (batch doubled), vocoder excluded. On
CPU the RTF is timed at 1 and 3 steps and extrapolated to 16 (all steps cost the same; use
--full-rtf to time 16). On CUDA it times 16 steps in fp32 and under bf16 and fp16 autocast (the
paper reports RTF 0.063 for ZipVoice-Dialog on a GPU) and prints the peak GPU memory.

ZipVoice-Dialog-Distill (same weights plus the guidance-scale embedding) is timed at 4 and 8
Euler steps without the CFG double pass, next to 16-step ZipVoice-Dialog with CFG, on the same
device (`--skip-distill` leaves it out).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.sampling import FRAME_RATE, sample  # noqa: E402
from model.zipvoice import (  # noqa: E402
    BASE_MODEL_CONFIG,
    ZipVoiceDialog,
    ZipVoiceDialogDistill,
    num_parameters,
)

VOCAB, S1, S2 = 388, 360, 361


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dialogue_tokens(n: int, g: torch.Generator) -> list[int]:
    """n random phone ids with a speaker tag every ~25 tokens, starting with [S1]."""
    ids = torch.randint(3, 300, (n,), generator=g).tolist()
    for i in range(0, n, 25):
        ids[i] = S1 if (i // 25) % 2 == 0 else S2
    return ids


def train_step_seconds(model, device: str, batch: int = 4, seconds: float = 10.0,
                       dtype: torch.dtype | None = None) -> float:
    g = torch.Generator().manual_seed(0)
    frames = round(seconds * FRAME_RATE)
    tokens = [dialogue_tokens(150, g) for _ in range(batch)]
    feats = (torch.randn(batch, frames, 100, generator=g) * 0.3).to(device)
    lens = torch.full((batch,), frames, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        loss = model(tokens, feats, lens)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - start
    del opt
    model.eval()
    return elapsed


def generation_seconds(model, device: str, num_step: int, dtype: torch.dtype | None = None,
                       prompt_seconds: float = 3.0, target_seconds: float = 10.0,
                       repeats: int = 1) -> float:
    """Best wall time of `sample` (text encoder + num_step CFG Euler steps), vocoder excluded."""
    g = torch.Generator().manual_seed(1)
    p_frames, t_frames = round(prompt_seconds * FRAME_RATE), round(target_seconds * FRAME_RATE)
    prompt = (torch.randn(1, p_frames, 100, generator=g) * 0.3).to(device)
    prompt_tokens, tokens = dialogue_tokens(45, g), dialogue_tokens(150, g)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            sample(model, [tokens], [prompt_tokens], prompt, torch.tensor([p_frames]),
                   num_step=num_step, guidance_scale=1.5, t_shift=0.5, target_frames=[t_frames],
                   generator=g)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def rtf_from_two_runs(model, device: str, target_seconds: float = 10.0, num_step: int = 16):
    """Every Euler step costs the same, so time 1 and 3 steps and extrapolate to 16:
    step = (t3 - t1) / 2, fixed = t1 - step, RTF = (fixed + 16 step) / 10 s."""
    t1 = generation_seconds(model, device, 1, target_seconds=target_seconds)
    t3 = generation_seconds(model, device, 3, target_seconds=target_seconds)
    step = (t3 - t1) / 2
    return (t1 - step + num_step * step) / target_seconds, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", choices=["explicit", "sdpa", "both"], default=None,
                   help="attention kernel(s) to time (default: explicit on CPU, both on CUDA)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--full-rtf", action="store_true",
                   help="on CPU, time all 16 steps instead of extrapolating from 1 and 3 steps")
    p.add_argument("--skip-distill", action="store_true", help="no Distill RTFs")
    args = p.parse_args()
    device = args.device
    backends = {"explicit": ["explicit"], "sdpa": ["sdpa"], "both": ["explicit", "sdpa"],
                None: ["explicit", "sdpa"] if device == "cuda" else ["explicit"]}[args.attention]

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    torch.manual_seed(0)
    model = ZipVoiceDialog(**BASE_MODEL_CONFIG, vocab_size=VOCAB, pad_id=0, spk_a_id=S1,
                           spk_b_id=S2).to(device).eval()
    print(f"parameters: {num_parameters(model):,} (ZipVoice-Dialog, vocab {VOCAB})")
    print(f"peak RSS after build: {peak_rss_gib():.2f} GiB")

    for backend in backends:
        cpu_rtf = None
        model.set_attention_backend(backend)
        if not args.skip_train:
            dt = train_step_seconds(model, device)
            print(f"[{backend}] train step, batch 4 x 10 s, fp32: {dt:.2f} s; "
                  f"peak RSS {peak_rss_gib():.2f} GiB")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            generation_seconds(model, device, 16, torch.bfloat16)  # warm-up
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
                rtf = generation_seconds(model, device, 16, dtype, repeats=3) / 10.0
                print(f"[{backend}] RTF, 10 s dialogue, 16 steps, CFG, {name}: {rtf:.4f}")
            print(f"[{backend}] peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        elif args.full_rtf:
            rtf = generation_seconds(model, device, 16) / 10.0
            print(f"[{backend}] RTF, 10 s dialogue after a 3 s prompt, 16 steps, CFG, fp32: "
                  f"{rtf:.3f}; peak RSS {peak_rss_gib():.2f} GiB")
        else:
            rtf, step = rtf_from_two_runs(model, device)
            cpu_rtf = rtf
            print(f"[{backend}] one CFG Euler step (batch 2 x 13 s): {step:.2f} s; RTF, 10 s "
                  f"dialogue after a 3 s prompt, 16 steps, fp32 (timed at 1 and 3 steps, "
                  f"extrapolated): {rtf:.3f}; peak RSS {peak_rss_gib():.2f} GiB")

        if not args.skip_distill:
            distill_rtfs(model, device, backend, args.full_rtf, cpu_rtf)


def distill_rtfs(model: ZipVoiceDialog, device: str, backend: str, full: bool,
                 dialog_rtf: float | None = None) -> None:
    """RTF of a 10 s dialogue after a 3 s prompt: 16-step Dialog (CFG) vs 4/8-step Distill."""
    distill = ZipVoiceDialogDistill(**BASE_MODEL_CONFIG, vocab_size=VOCAB, pad_id=0, spk_a_id=S1,
                                    spk_b_id=S2).to(device).eval()
    distill.load_state_dict(model.state_dict(), strict=False)  # + the guidance-scale embedding
    distill.set_attention_backend(backend)
    dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if device == "cuda" else [])
    for name, dtype in dtypes:
        repeats = 3 if device == "cuda" else 1
        generation_seconds(distill, device, 1, dtype)  # warm-up
        if device == "cuda" or full:
            dialog = generation_seconds(model, device, 16, dtype, repeats=repeats) / 10.0
            how = "timed"
        else:  # the extrapolated figure printed above
            dialog = dialog_rtf if dialog_rtf is not None else rtf_from_two_runs(model, device)[0]
            how = "extrapolated from 1 and 3 steps"
        few = {n: generation_seconds(distill, device, n, dtype, repeats=repeats) / 10.0
               for n in (4, 8)}
        print(f"[{backend}] RTF {name}, 10 s dialogue after a 3 s prompt: Dialog 16 steps + CFG "
              f"{dialog:.4f} ({how}); Dialog-Distill 8 steps {few[8]:.4f} "
              f"({dialog / few[8]:.1f}x faster), 4 steps {few[4]:.4f} ({dialog / few[4]:.1f}x)")
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
