#!/usr/bin/env bash
# The one prepared GPU run: install the wheels the GPU machine lacks (carried in .whl/, see
# bench/gpu_latency.py's docstring for the download command) into /tmp/site, then run the
# benchmark once with four cameras and the decoder's step compiled. Its output goes to
# $OUT/gpu_latency.txt when $OUT is set (the last line is the JSON summary).
#     bench/gpu_check.sh [more gpu_latency.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=/tmp/site python3 bench/gpu_latency.py --cameras 4 --compile on "$@" \
    2>&1 | tee "${OUT:-/tmp}/gpu_latency.txt"
