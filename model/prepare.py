"""Precompute features and string tokens into resumable feature stores.

    python -m model.prepare --config configs/train_dialog.yaml --num-workers 16
    python -m model.prepare --manifest data/OpenDialog/manifest.en.jsonl --out data/fbank/en

With --config, every dataset of `data.train` gets a store in `<data.feature_store>/<name>`
(the folder the trainer reads when `data.feature_store` is set). A store is a set of shards
(`shards/<k>.safetensors` with the unscaled (T, D) log-mels, float16 by default, and
`shards/<k>.jsonl`, the index with frame counts and string tokens, written last). A killed run
is simply started again: finished shards are kept, the others are recomputed. The shard plan
(sorted ids, `--shard-size` per shard) changes only when the manifest does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model.data import DatasetSpec, build_feature_store, read_manifest
from pipeline import clitools


def prepare_dataset(spec: DatasetSpec, out_dir: Path, *, tokenizer: str | None, num_workers: int,
                    shard_size: int, dtype: str, max_shards: int | None = None) -> dict:
    utts = read_manifest(spec.manifest, spec.root, spec.channels, spec.name, probe_durations=False)
    res = build_feature_store(utts, out_dir, channels=spec.channels, shard_size=shard_size,
                              num_workers=num_workers, dtype=dtype, tokenizer=tokenizer,
                              max_shards=max_shards)
    if res["failed"]:
        print(f"{spec.name}: {len(res['failed'])} utterance(s) skipped (unreadable audio), "
              f"e.g. {res['failed'][0]}")
    print(f"{spec.name}: {len(utts)} utterances, {res['num_shards']} shard(s): "
          f"{len(res['computed'])} computed, {len(res['skipped'])} already done"
          f"{'' if res['complete'] else ' (incomplete: run again)'} -> {out_dir}")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = clitools.parser("python -m model.prepare", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training YAML: prepare every data.train dataset")
    src.add_argument("--manifest", help="one manifest (.jsonl, .jsonl.gz, .parquet, .tsv)")
    p.add_argument("--out", help="store folder (--manifest), or the stores' parent (--config; "
                                 "default data.feature_store)")
    p.add_argument("--root", help="base of relative audio paths (--manifest; default: the manifest's folder)")
    p.add_argument("--channels", type=int, choices=[1, 2], default=1,
                   help="audio channels of the --manifest dataset (2: stereo, one speaker per channel)")
    p.add_argument("--tokenizer", choices=["dialog", "emilia", "espeak", "simple", "none"],
                   help="string tokens to cache (default: the config's; dialog with --manifest)")
    p.add_argument("--num-workers", type=int, default=1, help="processes computing features")
    p.add_argument("--shard-size", type=int, default=1000, help="utterances per shard")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage type of the log-mel features")
    p.add_argument("--max-shards", type=int, default=None,
                   help="compute at most this many new shards in this invocation")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.manifest and not args.out:
        p.error("--manifest needs --out")
    return clitools.run(lambda: _prepare(args), args.debug)


def _prepare(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tok = None if args.tokenizer == "none" else args.tokenizer
    common = dict(num_workers=args.num_workers, shard_size=args.shard_size, dtype=args.dtype,
                  max_shards=args.max_shards)
    if args.manifest:
        spec = DatasetSpec(name=Path(args.out).name or "data", manifest=args.manifest,
                           root=args.root, channels=args.channels)
        prepare_dataset(spec, Path(args.out), tokenizer=tok if args.tokenizer else "dialog", **common)
        return 0
    from model.train import load_config

    cfg = load_config(args.config)
    parent = args.out or cfg.data.feature_store
    if not parent:
        raise ValueError(f"{args.config}: the config has no data.feature_store: pass --out")
    if args.tokenizer is None:
        tok = cfg.model.tokenizer or ("emilia" if cfg.stage == "monologue" else "dialog")
    for spec in cfg.data.train:
        prepare_dataset(spec, Path(parent) / spec.name, tokenizer=tok, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
