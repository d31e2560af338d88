#!/usr/bin/env bash
# Set up the project's virtual environment and run its main jobs.
#   ./dev.sh quickstart   co-tune tiny models: a coordinator and 3 devices on loopback
#   ./dev.sh test         the test suite
#   ./dev.sh lint         ruff
#   ./dev.sh setup        only create/refresh .venv
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # torch first and pinned: 2.13.0 is the CPU build; an unpinned torch would pull a
  # multi-GB CUDA build. pip keeps downloaded and built wheels in its cache.
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  quickstart) setup; exec "$VENV/bin/cotune" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  lint) setup; exec "$VENV/bin/ruff" check . ;;
  *) sed -n '2,7p' "$0"; exit 1 ;;
esac
