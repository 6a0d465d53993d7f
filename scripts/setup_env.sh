#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0 (CPU) is pinned in setup.py; on machines with a local wheel cache pip takes it there.
.venv/bin/python -m pip install --quiet -e ".[test,engines,dali,fp8]"
