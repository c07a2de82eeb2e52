#!/usr/bin/env bash
# The GPU readiness check (benchmarks/gpu_check.py) on a bare GPU machine, in two steps:
#
#   benchmarks/gpu_check.sh prepare        # HERE, on a machine with this project's .venv and PyPI:
#                                          # writes .gpu_check/ (test audio + the Python packages the
#                                          # GPU machine's image lacks, for its Python 3.12, x86-64)
#   benchmarks/gpu_check.sh run OUT        # THERE, from the repository root, with .gpu_check/ copied
#                                          # along: unpacks the packages into /tmp/site (nothing is
#                                          # downloaded) and runs gpu_check.py --out OUT
#
# `benchmarks/gpu_check.sh dry-run OUT` runs the CPU dry run with the project's .venv.
# .gpu_check/ is git-ignored (added to .git/info/exclude); `prepare` prints its size, which must
# stay under what the machine's tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_check
PY=${PYTHON:-.venv/bin/python}

# What the image ('cuda': torch, transformers, onnxruntime, pyarrow, pandas, numba, tiktoken,
# lightning, ... see the device notes) lacks for gpu_check.py, pinned to this project's versions.
PACKAGES=(
  pydantic pydantic-core annotated-types typing-inspection
  soundfile soxr jiwer rapidfuzz
  jsonschema jsonschema-specifications referencing rpds-py
  openai-whisper more-itertools
  silero-vad speechmos
  pyannote.audio pyannote.core pyannote.database pyannote.pipeline pyannote.metrics pyannoteai-sdk
  asteroid-filterbanks pytorch-metric-learning torch-audiomentations julius torch-pitch-shift primepy
  optuna alembic sqlalchemy colorlog mako
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
)

prepare() {
  mkdir -p "$DIR/whl"
  grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> "$(git rev-parse --git-path info/exclude)"
  if [ ! -f "$DIR/audio/dialogue_long.flac" ]; then
    PYTHONPATH=$PWD "$PY" benchmarks/gpu_check.py --make-audio "$DIR/audio"
  fi
  local specs=() v
  for p in "${PACKAGES[@]}"; do
    v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
    specs+=("$p${v:+==$v}")
  done
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$DIR/whl" "${specs[@]}"
  # Ray's wheel alone (~80 MB) is over the carry limit: keep what Ray Data needs, xz-compressed.
  if [ ! -f "$DIR/ray.tar.xz" ]; then
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "ray==$("$PY" -m pip show ray | awk '/^Version:/{print $2}')"
    (cd "$tmp" && python3 -m zipfile -e ray-*.whl site \
      && rm -rf site/ray/jars site/ray/rllib site/ray/dashboard/client/build \
      && find site -name '*.map' -delete \
      && tar -C site -cJf ray.tar.xz .)
    mv "$tmp/ray.tar.xz" "$DIR/ray.tar.xz"
    rm -rf "$tmp"
  fi
  du -sh "$DIR" "$DIR"/*
  echo "carry: [\"$DIR\"]; working tree: $(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1) tracked"
}

run() {
  local out=${1:?usage: gpu_check.sh run OUT}
  if [ -d "$DIR/whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DIR"/whl/*.whl
  fi
  if [ -f "$DIR/ray.tar.xz" ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf "$DIR/ray.tar.xz"
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec python3 benchmarks/gpu_check.py --out "$out" --audio "$DIR/audio"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  dry-run) shift; PYTHONPATH=$PWD exec "$PY" benchmarks/gpu_check.py --dry-run --out "${1:?usage: gpu_check.sh dry-run OUT}" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
