#!/usr/bin/env bash
# One-shot setup on a fresh machine: system packages (when we may install them), a virtual
# environment in .venv, and every Python dependency pinned through constraints.txt.
# Re-running is cheap: the install is skipped while pyproject.toml, constraints.txt and this
# script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

need_sys=()
for tool in espeak-ng ffmpeg sox; do command -v "$tool" >/dev/null 2>&1 || need_sys+=("$tool"); done
if [ ${#need_sys[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing system packages: ${need_sys[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_sys[@]}" >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null && command -v apt-get >/dev/null; then
    echo "[setup] installing system packages with sudo: ${need_sys[*]}"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_sys[@]}" >/dev/null
  else
    echo "[setup] WARNING: missing ${need_sys[*]} and no rights to install them;" \
         "the example generator needs espeak-ng and m4a/opus decoding needs ffmpeg." >&2
  fi
fi

stamp_src=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -c1-16)
stamp=$VENV/.installed-$stamp_src
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
C=(-c "$ROOT/constraints.txt")
echo "[setup] installing Python dependencies into $VENV (a few minutes the first time)"
"${PIP[@]}" install "${C[@]}" -U pip wheel
"${PIP[@]}" install "${C[@]}" torch
"${PIP[@]}" install "${C[@]}" -e ".[test,pyannote,funasr,vocos]"
# openai-whisper declares triton (about 1 GB, GPU only): on CPU install it without it.
"${PIP[@]}" install "${C[@]}" --no-deps openai-whisper
"${PIP[@]}" install "${C[@]}" more-itertools numba tiktoken
# torchaudio/torchcodec wheels on the registry are CUDA builds whose compiled libraries fail to
# load against the CPU torch. Their pure-Python parts (resample, MelSpectrogram), which
# pyannote.audio and vocos use, work once the libraries are gone; file I/O never does and the
# project does not use it.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VENV/bin/python" -c 'import torchaudio' >/dev/null 2>&1; then
  rm -f "$site"/torchaudio/lib/*.so
fi
"$VENV/bin/python" -c 'import torchaudio, pyannote.audio, whisper, funasr, vocos' \
  || { echo "[setup] a backend failed to import" >&2; exit 1; }
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[setup] done"
