#!/usr/bin/env bash
# The GPU readiness check (benchmarks/gpu_check.py) on a bare GPU machine, in two steps:
#
#   benchmarks/gpu_check.sh prepare        # HERE, on a machine with this project's .venv and PyPI:
#                                          # writes .gpu_check/carry/ (test audio + site.tar.xz, the
#                                          # Python packages the GPU machine's image lacks, for its
#                                          # Python 3.12 on x86-64, trimmed to what the check uses)
#   benchmarks/gpu_check.sh run OUT        # THERE, from the repository root, with .gpu_check/carry
#                                          # copied along: unpacks the packages into /tmp/site
#                                          # (nothing is downloaded) and runs gpu_check.py --out OUT
#
# `benchmarks/gpu_check.sh dry-run OUT` runs the CPU dry run with the project's .venv.
# .gpu_check/ is git-ignored (added to .git/info/exclude); `prepare` prints the size of
# .gpu_check/carry, which must stay under what the machine's tool carries (64 MiB with the tree).
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
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common googleapis-common-protos
)

prepare() {
  local build=$DIR/build carry=$DIR/carry
  mkdir -p "$build/whl" "$carry"
  grep -qx "/$DIR/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null \
    || echo "/$DIR/" >> "$(git rev-parse --git-path info/exclude)"
  if [ ! -f "$carry/audio/dialogue_long.flac" ]; then
    PYTHONPATH=$PWD "$PY" benchmarks/gpu_check.py --make-audio "$carry/audio"
  fi
  local specs=() v
  for p in "${PACKAGES[@]}" ray; do
    v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
    specs+=("$p${v:+==$v}")
  done
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
              --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
  for spec in "${specs[@]}"; do
    # Packages published only as source (openai-whisper) are pure Python: build their wheel here.
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$build/whl" "$spec" 2>/dev/null \
      || python3 -m pip wheel -q --no-deps -w "$build/whl" "$spec"
  done
  rm -rf "$build/site"
  python3 -m pip install -q --no-deps --no-index --no-compile --target "$build/site" "${plat[@]}" "$build"/whl/*.whl
  # Only what the check uses: the carried tree must stay small (Ray's wheel alone is ~80 MB).
  (cd "$build/site" && rm -rf ray/jars ray/rllib ray/dashboard/client/build bin \
    speechmos/aecmos_models speechmos/plcmos_models \
    && find silero_vad/data -type f ! -name silero_vad.onnx -delete && find . -name '*.map' -delete)
  tar -C "$build/site" -cf - . | xz -T0 -6 > "$carry/site.tar.xz"
  du -sh "$carry"/*
  echo "carry: [\"$carry\"]; tracked files: $(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1)"
}

run() {
  local out=${1:?usage: gpu_check.sh run OUT}
  mkdir -p /tmp/site
  tar -C /tmp/site -xJf "$DIR/carry/site.tar.xz"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec python3 benchmarks/gpu_check.py --out "$out" --audio "$DIR/carry/audio"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  dry-run) shift; PYTHONPATH=$PWD exec "$PY" benchmarks/gpu_check.py --dry-run --out "${1:?usage: gpu_check.sh dry-run OUT}" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
