#!/bin/sh
# One call that checks everything this code does on a GPU: sh tools/measure/gpu_check.sh OUT_DIR
# (make gpu-check OUT=OUT_DIR). Writes OUT_DIR/summary.md and summary.json; about 5 minutes
# on one GPU, stopped at 8. Without a CUDA device: one line, exit status 1. What each
# section does: tools/measure/gpu_check.py.
set -u
if [ $# -lt 1 ]; then
    echo "usage: sh tools/measure/gpu_check.sh OUT_DIR [--device cpu] [--only SECTIONS]" >&2
    exit 2
fi
out=$1; shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$out" || exit 2
# the sections stop starting at 7 minutes (--budget); the timeout is the hard stop
exec timeout --kill-after=10 480 "$PYTHON" -u tools/measure/gpu_check.py --out "$out" --budget 420 "$@"
