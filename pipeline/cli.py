"""Command line of the pipeline (``run_pipeline.py`` and the ``opendialog-pipeline`` script)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.runner import OutputLocked, run_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Mine two-speaker dialogues from audio (OpenDialog recipe).")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/local.yaml)")
    ap.add_argument("--input", help="directory of audio (walked recursively) or a text file of paths")
    ap.add_argument("--output", help="output directory (rerunning into it resumes)")
    ap.add_argument("--ray-address", help="existing Ray cluster, e.g. 'auto' or 'ray://head:10001'")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--retry-failed", action="store_true", help="run recordings whose verdict is 'failed' again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"progress": False} if args.no_progress else {}
    try:
        cfg = load_config(args.config, overrides)
        if args.input is None and cfg.run.input and cfg.path is not None:
            # Relative inputs in a config are relative to the repository root (where configs/ lives).
            inp = Path(cfg.run.input)
            args.input = str(inp if inp.is_absolute() else cfg.path.resolve().parent.parent / inp)
        result = run_pipeline(cfg, args.input, args.output, args.ray_address, retry_failed=args.retry_failed)
    except (ConfigError, OutputLocked, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[pipeline] done in {result.seconds:.1f} s: results in {result.output}")
    print(f"[pipeline]   manifests: {result.output / 'manifests'}")
    print(f"[pipeline]   ledger:    {result.output / 'ledger.parquet'}")
    export = result.output / "export"
    if export.exists():
        print(f"[pipeline]   corpus:    {export}")
    report = result.output / "report" / "report.md"
    if report.exists():
        print(f"[pipeline]   report:    {report}")
    return 0
