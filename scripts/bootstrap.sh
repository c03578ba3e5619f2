#!/usr/bin/env bash
# Creates .venv and installs poisonaudit with its test extras, once.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.poisonaudit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from local disk here.
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi
