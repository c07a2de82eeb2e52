"""Command line of the pipeline (``run_pipeline.py`` and the ``opendialog-pipeline`` script)."""

from __future__ import annotations

import json
import logging
import sys

from pipeline import clitools
from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config

DESCRIPTION = """\
Mine two-speaker dialogues from audio (OpenDialog recipe).

examples:
  run_pipeline.py                                    # configs/local.yaml on the bundled example
  run_pipeline.py one.wav two.mp3 --output out/x     # these files
  run_pipeline.py 'raw/**/*.flac' --output out/x     # a glob (quoted: expanded here, recursively)
  run_pipeline.py --config configs/opendialog.yaml --input /data/raw --input /data/more \\
      --set stages.quality.min_ovrl=3.0 --output /data/curated

Relative paths (arguments and run.input / run.output in a config) are relative to the current
directory."""


def build_parser():
    ap = clitools.parser(None, DESCRIPTION)
    ap.add_argument("inputs", nargs="*", metavar="FILE_OR_DIR",
                    help="input files, folders (walked recursively), globs or list files (text whose "
                         "lines are paths); default: run.input of the config")
    ap.add_argument("--input", action="append", default=[], metavar="PATH",
                    help="one more input (a file, folder, glob or list file); repeatable")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML config")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by its dotted key, the value read as YAML, e.g. "
                         "--set stages.quality.min_ovrl=3.0 (repeatable; validated like the file)")
    ap.add_argument("--output", help="output folder; rerunning into it resumes (default: run.output of the config)")
    ap.add_argument("--ray-address", help="existing Ray cluster, e.g. 'auto' or 'ray://head:10001' "
                                          "(default: run.ray.address of the config, else a local Ray)")
    ap.add_argument("--no-progress", action="store_true", help="no per-stage progress display")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                    help="level of the pipeline's own log messages")
    ap.add_argument("--verbose", action="store_true",
                    help="also show Ray's own progress bars, log lines and worker output")
    ap.add_argument("--retry-failed", action="store_true",
                    help="run recordings whose verdict is 'failed' again (not 'rejected' ones)")
    ap.add_argument("--check", metavar="DIR",
                    help="run nothing: verify that the published corpus in DIR (an export folder, or an output "
                         "folder holding export/) is whole: segments.parquet, manifest.<lang>.jsonl, the lhotse "
                         "manifests, RTTM files, metadata.jsonl and the audio files agree; exit 1 if not")
    return ap


def main(argv: list[str] | None = None) -> int:
    # Intermixed: files may come before and after options (run_pipeline.py a.wav --output X b.wav).
    args = build_parser().parse_intermixed_args(argv)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.store import OutputLocked

    return clitools.run(lambda: _run(args), args.debug, (ConfigError, OutputLocked))


def _check(folder: str) -> int:
    from pathlib import Path

    from pipeline import corpus

    if not Path(folder).is_dir():
        raise NotADirectoryError(f"{folder}: no such folder")
    problems = corpus.check(folder)
    for p in problems:
        print(f"[check] {p}")
    if problems:
        return 1
    root = Path(folder) if (Path(folder) / corpus.CORPUS_JSON).exists() else Path(folder) / "export"
    info = json.loads((root / corpus.CORPUS_JSON).read_text())
    print(f"[check] {root}: ok, {info['segments']} segments, {info['seconds'] / 3600:.3f} h "
          f"(run {info['run_id']})")
    return 0


def _run(args) -> int:
    from pipeline.runner import run_pipeline

    if args.check:
        return _check(args.check)

    overrides = {"progress": False} if args.no_progress else {}
    cfg = load_config(args.config, overrides, sets=args.sets)
    inputs = list(args.inputs) + list(args.input)
    result = run_pipeline(cfg, inputs or None, args.output, args.ray_address, verbose=args.verbose,
                          retry_failed=args.retry_failed)
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


if __name__ == "__main__":
    sys.exit(main())
