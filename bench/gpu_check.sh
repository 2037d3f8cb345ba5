#!/usr/bin/env bash
# One call on a CUDA machine: install carried wheels (liger-kernel, cut-cross-entropy, ... placed
# in .whl/ beside the checkout, for a machine without network), build vocabsem_fast with its CUDA
# extension where nvcc and a CUDA torch exist, then check every GPU backend and benchmark.
#   bash bench/gpu_check.sh [--quick]        results: bench/results/gpu-check.json (or $OUT/)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
out=${OUT:-bench/results}/gpu-check.json
timeout 540 python3 bench/library/gpu_check.py --out "$out" "$@"
