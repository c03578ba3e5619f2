#!/usr/bin/env bash
# Creates .venv and installs poisonaudit, once: `bootstrap.sh serve` what serving needs,
# `bootstrap.sh test` (the default) that plus the test extras.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}
case "$what" in
  serve) spec='.' ;;
  test) spec='.[test]' ;;
  *) echo "bootstrap.sh: unknown target '$what' (valid: serve, test)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
say() { echo "poisonaudit setup [$(date +%H:%M:%S)]: $*"; }
stamp=.venv/.poisonaudit-installed-$what
legacy=.venv/.poisonaudit-installed  # what earlier versions of this script wrote after a test install
if [ -f "$legacy" ] && [ ! -f .venv/.poisonaudit-installed-test ] && [ ! "pyproject.toml" -nt "$legacy" ]; then
  cp -p "$legacy" .venv/.poisonaudit-installed-test
fi
if [ "$what" = serve ] && [ -f .venv/.poisonaudit-installed-test ] && [ ! pyproject.toml -nt .venv/.poisonaudit-installed-test ]; then
  exit 0  # a test install holds everything serving needs
fi
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
  say "first install: torch 2.14.1 and torchvision 0.29.1 (about 5.5 GB in .venv) and the rest; 3-8 minutes"
fi
say "installing poisonaudit ($what: pip install -e '$spec')"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from local disk here.
start=$(date +%s)
.venv/bin/python -m pip install --quiet --progress-bar off -e "$spec"
touch "$stamp"
say "done in $(( $(date +%s) - start )) s"
