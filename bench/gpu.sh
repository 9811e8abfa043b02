#!/usr/bin/env bash
# Run bench/gpu.py on the GPU machine: bash bench/gpu.sh [--dry-run] OUT_DIR [more gpu.py options]
# Wheels carried in .whl/ (pydantic, torch-pruning, ... not installed there) go to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # a dev checkout
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  # pip if the interpreter has it; a wheel is a zip archive, so unpacking it also works
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    || for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site; done
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py "$@"
