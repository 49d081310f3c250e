#!/usr/bin/env bash
# Everything a GPU machine should run, in one go: build with CUDA (failing if the CUDA kernels
# are not built), the GPU tests, then the full benchmark suite as JSON under bench/results/.
#   bash bench/gpu_session.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
FORCE_CUDA=1 python -m pip install -q -e . --no-build-isolation
python -m pyface.info | tee "$out/info-$(date -u +%Y%m%d).txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests-$(date -u +%Y%m%d).txt"
python -m pyface bench --device cuda --size full --json "$out/"
