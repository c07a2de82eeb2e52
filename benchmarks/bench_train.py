"""Training throughput of ZipVoice-Dialog at the reference size (configs/model/zipvoice_base.json).

    python benchmarks/bench_train.py                       # CPU: 2 x 5 s, fp32
    python benchmarks/bench_train.py --gpu-seconds 500     # + CUDA (when present): ~500 s, bf16

Times `model.train.training_step` (forward, backward, ScaledAdam step; the trainer's own code)
on batches held in memory: the data pipeline is not included (precomputed features make it
negligible; on-the-fly features need enough DataLoader workers). Features are the log-mels of a
generated dialogue, tokens ~14 per second of audio, vocabulary 360 + 28 like the released
dialog model. Reports seconds of audio per wall second, peak memory and, on CUDA, hours of audio
per GPU-hour and the projected wall time of the paper's recipe (60k updates, 8 GPUs x 500 s per
update, each GPU running the measured per-GPU step; DDP all-reduce not included).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.checkpoint import build_model, read_model_config  # noqa: E402
from model.features import FEAT_SCALE, VocosFbank  # noqa: E402
from model.optim import FixedLR, ScaledAdam  # noqa: E402
from model.train import training_step  # noqa: E402

FRAME_RATE = 24000 / 256
TOKENS_PER_SECOND = 14


def token_table() -> dict[str, int]:
    table = {"_": 0, **{f"t{i}": i for i in range(1, 360)}}
    for tok in ["[S1]", "[S2]"] + [f"x{i}" for i in range(26)]:
        table[tok] = len(table)
    return table


def dialogue_features(seconds: float) -> torch.Tensor:
    """Scaled log-mels (T, 100) of a generated dialogue, looped to `seconds`."""
    from tools.synth import synth_dialogue

    clip = synth_dialogue(0, n_turns=4, sample_rate=24000)
    feats = VocosFbank().extract(clip.audio, 24000) * FEAT_SCALE
    n = int(seconds * FRAME_RATE)
    reps = n // feats.shape[0] + 1
    return feats.repeat(reps, 1)[:n]


def make_batch(batch_size: int, seconds: float, table: dict[str, int]):
    feats = dialogue_features(seconds).unsqueeze(0).repeat(batch_size, 1, 1)
    lens = torch.full((batch_size,), feats.shape[1], dtype=torch.long)
    n_tok = int(seconds * TOKENS_PER_SECOND)
    g = torch.Generator().manual_seed(0)
    tokens = []
    for _ in range(batch_size):
        body = torch.randint(4, 360, (n_tok,), generator=g).tolist()
        half = n_tok // 2
        tokens.append([table["[S1]"]] + body[:half] + [table["[S2]"]] + body[half:])
    return tokens, feats, lens


def run(device: torch.device, precision: str, batch_size: int, seconds: float, steps: int,
        attention: str) -> dict:
    table = token_table()
    torch.manual_seed(0)
    model = build_model("zipvoice_dialog", read_model_config(ROOT / "configs/model/zipvoice_base.json"),
                        table)
    model.set_attention_backend(attention)
    model.to(device).train()
    optimizer = ScaledAdam(model.parameters(), lr=1e-4)
    FixedLR(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16", init_scale=1.0)
    tokens, feats, lens = make_batch(batch_size, seconds, table)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, kernels, optimizer state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = training_step(model, optimizer, scaler, tokens, feats, lens, device=device,
                            precision=precision, condition_drop_ratio=0.2)
        float(out["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    audio = batch_size * seconds
    res = {"device": str(device), "precision": precision, "attention": attention,
           "batch": f"{batch_size} x {seconds:g} s", "audio_seconds_per_step": audio,
           "step_seconds_median": round(step, 3), "audio_s_per_s": round(audio / step, 2),
           "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        res["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        res["audio_hours_per_gpu_hour"] = round(audio / step, 1)
        # The paper's recipe: 60k updates, 8 GPUs each with a 500 s batch; every GPU runs the
        # measured per-GPU step in parallel.
        per_update = step * 500.0 / audio
        res["recipe_60k_updates_8x500s_hours"] = round(60000 * per_update / 3600, 1)
        res["recipe_gpu_hours"] = round(8 * 60000 * per_update / 3600, 1)
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-batch", type=int, default=2)
    p.add_argument("--cpu-seconds", type=float, default=5.0)
    p.add_argument("--cpu-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-seconds", type=float, default=500.0, help="audio per GPU batch")
    p.add_argument("--gpu-utt-seconds", type=float, default=10.0, help="length of each utterance")
    p.add_argument("--gpu-steps", type=int, default=5)
    p.add_argument("--gpu-precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        res = run(torch.device("cpu"), "fp32", args.cpu_batch, args.cpu_seconds, args.cpu_steps,
                  "explicit")
        res["threads"] = torch.get_num_threads()
        print(json.dumps(res))
    if torch.cuda.is_available():
        n = max(1, int(round(args.gpu_seconds / args.gpu_utt_seconds)))
        for attention in ("explicit", "sdpa"):
            try:
                res = run(torch.device("cuda"), args.gpu_precision, n, args.gpu_utt_seconds,
                          args.gpu_steps, attention)
            except RuntimeError as e:  # out of memory, or no fused kernel for this case
                res = {"device": "cuda", "attention": attention, "error": str(e).splitlines()[0]}
            print(json.dumps(res))
            torch.cuda.empty_cache()
    else:
        print(json.dumps({"cuda": "not available: the 500 s bf16 figures need a GPU"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
