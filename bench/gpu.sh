#!/usr/bin/env bash
# Run bench/gpu.py on the GPU machine: bash bench/gpu.sh [--dry-run] OUT_DIR [more gpu.py options]
# Wheels carried in .whl/ (pydantic, torch-pruning, ... not installed there) go to a private
# directory for this run; pip refuses wheels built for another Python, so they never shadow the
# packages of a development environment. The CPU dry run uses the environment as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # a dev checkout
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  else  # no pip there: a wheel is a zip archive
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$site"; done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py "$@"
