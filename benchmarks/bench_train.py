"""Training throughput of ZipVoice-Dialog at the reference size (configs/model/zipvoice_base.json).

    python benchmarks/bench_train.py                       # CPU: 2 x 5 s, fp32
    python benchmarks/bench_train.py --gpu-seconds 500     # + CUDA (when present): ~500 s, bf16
    python benchmarks/bench_train.py --reference-dir DIR   # + our step vs the reference's, CPU

`--reference-dir` names a folder holding the reference implementation's `zipvoice` package
(k2-fsa/ZipVoice: its models/modules/zipformer.py, models/modules/scaling.py and utils/optim.py;
it is not part of this project). Both models are built from the same config and weights (strict
load) and wrapped by the same `model.zipvoice` text/loss code, so the comparison is the Zipformer
(forward + backward) and the ScaledAdam step; the reference's schedules sit at batch count 100000
as in its fine-tuning recipes (our defaults). Steps alternate ours/reference in one process so a
busy machine slows both alike; peak memory is taken from one child process per side.

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
import copy
import json
import subprocess
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


def reference_model(ref_dir: Path, ours: torch.nn.Module):
    """A copy of `ours` whose text encoder and decoder are the reference's TTSZipformer, holding
    the same weights; and the reference's ScaledAdam class."""
    sys.path.insert(0, str(ref_dir))
    from zipvoice.models.modules.zipformer import TTSZipformer as RefZipformer
    from zipvoice.utils.optim import ScaledAdam as RefScaledAdam

    c = ours.config.to_dict()
    heads = dict(query_head_dim=c["query_head_dim"], pos_head_dim=c["pos_head_dim"],
                 value_head_dim=c["value_head_dim"], pos_dim=c["pos_dim"])
    ref = copy.deepcopy(ours)
    ref.text_encoder = RefZipformer(
        in_dim=c["text_embed_dim"], out_dim=c["feat_dim"], downsampling_factor=1,
        num_encoder_layers=c["text_encoder_num_layers"],
        cnn_module_kernel=c["text_encoder_cnn_module_kernel"], encoder_dim=c["text_encoder_dim"],
        feedforward_dim=c["text_encoder_feedforward_dim"], num_heads=c["text_encoder_num_heads"],
        use_time_embed=False, **heads)
    ref.fm_decoder = RefZipformer(
        in_dim=3 * c["feat_dim"], out_dim=c["feat_dim"],
        downsampling_factor=tuple(c["fm_decoder_downsampling_factor"]),
        num_encoder_layers=tuple(c["fm_decoder_num_layers"]),
        cnn_module_kernel=tuple(c["fm_decoder_cnn_module_kernel"]), encoder_dim=c["fm_decoder_dim"],
        feedforward_dim=c["fm_decoder_feedforward_dim"], num_heads=c["fm_decoder_num_heads"],
        use_time_embed=True, time_embed_dim=c["time_embed_dim"], **heads)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for m in ref.modules():  # the reference trainer's set_batch_count, fine-tuning offset
        if hasattr(m, "batch_count"):
            m.batch_count = 100000
    return ref, RefScaledAdam


def _one_side(which: str, ref_dir: Path | None) -> dict:
    table = token_table()
    torch.manual_seed(0)
    model = build_model("zipvoice_dialog", read_model_config(ROOT / "configs/model/zipvoice_base.json"),
                        table)
    model.set_attention_backend("explicit")
    opt_cls = ScaledAdam
    if which == "reference":
        model, opt_cls = reference_model(ref_dir, model)
    model.train()
    optimizer = opt_cls(model.parameters(), lr=1e-4, clipping_scale=2.0)
    return {"model": model, "optimizer": optimizer,
            "scaler": torch.amp.GradScaler("cpu", enabled=False)}


def compare_reference(ref_dir: Path, batch_size: int, seconds: float, steps: int) -> dict:
    """Median wall and process-CPU seconds of our step and the reference's, alternating."""
    sides = {w: _one_side(w, ref_dir) for w in ("ours", "reference")}
    tokens, feats, lens = make_batch(batch_size, seconds, token_table())
    dev = torch.device("cpu")
    times = {w: {"wall": [], "cpu": []} for w in sides}
    for i in range(steps + 1):
        for w, s in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = training_step(s["model"], s["optimizer"], s["scaler"], tokens, feats, lens,
                                device=dev, precision="fp32", condition_drop_ratio=0.2)
            float(out["loss"])
            if i > 0:  # the first step of each warms up
                times[w]["wall"].append(time.perf_counter() - t0)
                times[w]["cpu"].append(time.process_time() - c0)
    med = {w: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for w, t in times.items()}
    res = {"batch": f"{batch_size} x {seconds:g} s", "steps": steps,
           "threads": torch.get_num_threads(),
           "ours_step_s": {k: round(v, 3) for k, v in med["ours"].items()},
           "reference_step_s": {k: round(v, 3) for k, v in med["reference"].items()},
           "ratio_wall": round(med["ours"]["wall"] / med["reference"]["wall"], 3),
           "ratio_cpu": round(med["ours"]["cpu"] / med["reference"]["cpu"], 3)}
    # Peak memory per side: a fresh child process each (ru_maxrss is per process).
    for w in ("ours", "reference"):
        cmd = [sys.executable, __file__, "--peak-memory-of", w, "--reference-dir", str(ref_dir),
               "--cpu-batch", str(batch_size), "--cpu-seconds", str(seconds),
               "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[f"{w}_peak_rss_gib"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]
    return res


def peak_memory_of(which: str, ref_dir: Path, batch_size: int, seconds: float) -> dict:
    s = _one_side(which, ref_dir)
    tokens, feats, lens = make_batch(batch_size, seconds, token_table())
    for _ in range(2):  # the second step has the optimizer state allocated
        out = training_step(s["model"], s["optimizer"], s["scaler"], tokens, feats, lens,
                            device=torch.device("cpu"), precision="fp32", condition_drop_ratio=0.2)
        float(out["loss"])
    return {"side": which, "peak_rss_gib": round(_vm_hwm_kib() / 2 ** 20, 3)}


def _vm_hwm_kib() -> int:
    """Peak resident set of this process image. Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="folder with the reference's `zipvoice` package: time its step beside ours")
    p.add_argument("--reference-steps", type=int, default=4)
    p.add_argument("--peak-memory-of", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        print(json.dumps(peak_memory_of(args.peak_memory_of, args.reference_dir, args.cpu_batch,
                                        args.cpu_seconds)))
        return 0
    if args.reference_dir is not None:
        if (args.reference_dir / "zipvoice" / "models" / "modules" / "zipformer.py").is_file():
            print(json.dumps(compare_reference(args.reference_dir, args.cpu_batch, args.cpu_seconds,
                                               args.reference_steps)))
        else:
            print(json.dumps({"reference": f"reference not available in {args.reference_dir}"}))
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
