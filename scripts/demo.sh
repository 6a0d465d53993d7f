#!/usr/bin/env bash
# The README's main job: set up the environment, then run the whole SFD pipeline on the bundled
# digits data (about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python launchers/demo.py --config configs/demo.yaml "$@"
