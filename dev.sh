#!/usr/bin/env bash
# The two commands of README.md. Each creates .venv and installs the package on first use (or when
# pyproject.toml changed), then runs:
#   bash dev.sh demo [hydra overrides...]   the embedded toy pipeline (python -m uae_lightning)
#   bash dev.sh test [pytest args...]       the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${UAE_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  local stamp="$VENV/.uae-installed"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt dev.sh ]; then
    return
  fi
  echo "[dev.sh] installing into $VENV (first run only; about 2-3 minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch and torchvision must come as a matching pair (the Qwen2.5-VL processor needs torchvision).
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  # PYTHONWARNINGS reaches setuptools in pip's build environment: its generic notice about editable installs is not
  # something a user of this repository can act on.
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) setup; exec "$VENV/bin/python" -m uae_lightning "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash dev.sh demo [overrides...] | bash dev.sh test [pytest args...]" >&2; exit 2 ;;
esac
