#!/usr/bin/env bash
# Set everything up (system packages, .venv, pinned dependencies), then run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_runner.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
