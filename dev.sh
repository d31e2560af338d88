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

# The state-layer tests also run against a real PostgreSQL server when one is installed
# (Debian: apt-get install postgresql). This starts the local cluster and a test role that
# may create databases (each test makes, then drops, its own) and nothing more: not a
# superuser, whose password on loopback would be the whole server's.
start_postgres() {
  if [ -n "${COTUNE_TEST_POSTGRES_URL:-}" ]; then return; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL (Debian package, run as root) not found: its tests will be skipped" >&2
    return
  fi
  local ver
  ver=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
  pg_ctlcluster "$ver" main start 2>/dev/null || true
  if ! su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'cotune'\"" | grep -q 1; then
    su postgres -c "psql -qc \"CREATE ROLE cotune LOGIN CREATEDB PASSWORD 'cotune'\""
  fi
  # A role an older dev.sh made a superuser keeps only what the tests need.
  su postgres -c "psql -qc \"ALTER ROLE cotune NOSUPERUSER NOCREATEROLE CREATEDB\""
  export COTUNE_TEST_POSTGRES_URL="postgresql+psycopg://cotune:cotune@127.0.0.1:5432/postgres"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  quickstart) setup; exec "$VENV/bin/cotune" demo "$@" ;;
  test) setup; start_postgres; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  lint) setup; exec "$VENV/bin/ruff" check . ;;
  *) sed -n '2,7p' "$0"; exit 1 ;;
esac
