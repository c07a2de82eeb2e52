#!/usr/bin/env bash
# Set everything up (system packages, .venv, pinned dependencies), then run the pipeline with
# configs/local.yaml on the bundled example. Extra arguments go to run_pipeline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python run_pipeline.py "$@"
