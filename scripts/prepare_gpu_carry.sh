#!/usr/bin/env bash
# Makes the two ignored folders the first GPU call carries (scripts/gpu_session.sh), which a fresh
# checkout lacks:
#   .peer/sfd, .peer/peer_bench.py  the reference code and the shared tool that times its step;
#   .whl/torchao-0.18.0-*.whl       torchao for the FP8 steps (the GPU image has no torchao).
#
#   bash scripts/prepare_gpu_carry.sh REFERENCE_GIT_DIR [SHARED_TOOLS_DIR]
#
# REFERENCE_GIT_DIR: a git directory of github.com/yuemingPAN/SFD (the search tool's `fetch`
# returns one, /work/.mirror/yuemingPAN+SFD/repo); SHARED_TOOLS_DIR defaults to ../shared/tools.
# Then call the device with carry [".peer", ".whl"] (~4 MB). Nothing of the reference is committed:
# .peer/ and .whl/ are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
REFERENCE=${1:?give the git directory of the reference repository yuemingPAN/SFD}
TOOLS=${2:-../shared/tools}
PY=${PYTHON:-.venv/bin/python}
[ -f "$TOOLS/peer_bench.py" ] || { echo "no peer_bench.py in $TOOLS" >&2; exit 2; }
git --git-dir "$REFERENCE" rev-parse --verify -q HEAD > /dev/null \
  || { echo "$REFERENCE is not a git directory with a HEAD" >&2; exit 2; }

rm -rf .peer.tmp && mkdir -p .peer.tmp/sfd
git --git-dir "$REFERENCE" archive HEAD models transport dataset | tar -x -C .peer.tmp/sfd
cp "$TOOLS/peer_bench.py" .peer.tmp/
rm -rf .peer && mv .peer.tmp .peer  # a failed run above leaves the old .peer as it was

mkdir -p .whl
# abi3 wheel: the GPU machine's Python 3.12 takes it. --no-deps: the image has torch.
"$PY" -m pip download --quiet --no-deps --dest .whl torchao==0.18.0
echo "ready: .peer ($(git --git-dir "$REFERENCE" rev-parse --short HEAD)) and $(ls .whl/*.whl | tr '\n' ' ')"
