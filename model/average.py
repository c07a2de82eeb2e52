"""Average the weights of a training run over a range of updates (fact sheet 7.3).

    python -m model.average --exp-dir exp/zipvoice_dialog --iter 60000 --avg 2
    python -m model.average --exp-dir exp/zipvoice --epoch 11 --avg 4 --out exp/zipvoice/model.pt

Every checkpoint carries `model_avg`, the running mean of the weights taken every
`average_period` updates since the start. With s and e the update counts of the start and end
checkpoints (rounded down to a multiple of average_period), the mean of the weights over the
updates (s, e] is (avg_e * e - avg_s * s) / (e - s). `--iter N --avg k` uses the k+1 newest
`checkpoint-M.pt` with M <= N (start = the oldest of them); `--epoch E --avg k` uses
`epoch-(E-k).pt` and `epoch-E.pt`. The result is `{"model": state_dict}`, the released format,
loadable by `python -m model.infer` when model.json and tokens.txt lie beside it (the default
output goes into the experiment folder, where they are).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from pipeline import clitools
from pipeline.atomic import atomic_write

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def _load(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint ({e})") from None
    for key in ("model", "model_avg", "batch_idx_train", "average_period"):
        if ckpt.get(key) is None:
            raise ValueError(f"{path}: not a training checkpoint with a running average "
                             f"('{key}' missing)")
    return ckpt


def select_checkpoints(exp_dir: str | os.PathLike, *, iteration: int | None = None,
                       epoch: int | None = None, avg: int = 2) -> tuple[Path, Path]:
    """(start, end) checkpoint files for an --iter or --epoch average."""
    exp = Path(exp_dir)
    if avg < 1:
        raise ValueError(f"--avg must be >= 1, got {avg}")
    if (iteration is None) == (epoch is None):
        raise ValueError("give exactly one of iteration (--iter) and epoch (--epoch)")
    if epoch is not None:
        start, end = exp / f"epoch-{epoch - avg}.pt", exp / f"epoch-{epoch}.pt"
        for p in (start, end):
            if not p.is_file():
                raise ValueError(f"{p} not found (epoch averaging needs epoch-{epoch - avg}.pt "
                                 f"and epoch-{epoch}.pt)")
        return start, end
    found = sorted((int(m.group(1)), p) for p in exp.glob("checkpoint-*.pt")
                   if (m := CHECKPOINT_RE.match(p.name)) and int(m.group(1)) <= iteration)
    if len(found) < avg + 1:
        raise ValueError(f"{exp}: averaging {avg} interval(s) up to update {iteration} needs "
                         f"{avg + 1} checkpoint-N.pt files with N <= {iteration}, found "
                         f"{[n for n, _ in found]}")
    return found[-(avg + 1)][1], found[-1][1]


def average_checkpoints(exp_dir: str | os.PathLike, *, iteration: int | None = None,
                        epoch: int | None = None, avg: int = 2) -> tuple[dict, str]:
    """The state dict averaged over the updates (s, e], cast to the model's dtypes."""
    start_path, end_path = select_checkpoints(exp_dir, iteration=iteration, epoch=epoch, avg=avg)
    start, end = _load(start_path), _load(end_path)
    period = int(end["average_period"])
    if int(start["average_period"]) != period:
        raise ValueError(f"{start_path} and {end_path} use different average periods")
    s = int(start["batch_idx_train"]) // period * period
    e = int(end["batch_idx_train"]) // period * period
    if e <= s:
        raise ValueError(f"{start_path} (update {start['batch_idx_train']}) and {end_path} "
                         f"(update {end['batch_idx_train']}) span no averaging period of {period}")
    avg_s, avg_e = start["model_avg"], end["model_avg"]
    if avg_s.keys() != avg_e.keys() or avg_e.keys() != end["model"].keys():
        raise ValueError(f"{start_path} and {end_path} hold different models")
    out = {}
    for k, ref in end["model"].items():
        mean = (avg_e[k].to(torch.float64) * e - avg_s[k].to(torch.float64) * s) / (e - s)
        out[k] = mean.to(ref.dtype)
    return out, f"mean of the weights over updates ({s}, {e}] from {start_path.name} and {end_path.name}"


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m model.average", __doc__)
    p.add_argument("--exp-dir", required=True, help="experiment folder with the checkpoint-N.pt / epoch-E.pt files")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--iter", type=int, dest="iteration", help="last update of the range")
    g.add_argument("--epoch", type=int, help="last epoch of the range")
    p.add_argument("--avg", type=int, default=2, help="number of checkpoint intervals")
    p.add_argument("--out", help="output .pt (default: EXP/iter-N-avg-K.pt or EXP/epoch-E-avg-K.pt)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return clitools.run(lambda: _average(args), args.debug)


def _average(args) -> int:
    sd, info = average_checkpoints(args.exp_dir, iteration=args.iteration, epoch=args.epoch,
                                   avg=args.avg)
    name = (f"iter-{args.iteration}-avg-{args.avg}.pt" if args.iteration is not None
            else f"epoch-{args.epoch}-avg-{args.avg}.pt")
    out = Path(args.out) if args.out else Path(args.exp_dir) / name
    atomic_write(out, lambda tmp: torch.save({"model": sd}, tmp))
    print(f"wrote {out}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
