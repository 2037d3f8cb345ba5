#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine without a GPU (CI): every .cu file with nvcc for
# sm_90, and a syntax check of the torch glue (.cpp) against the installed torch headers. The CPU
# wheel of torch ships c10/cuda headers but not the CMake-generated macros header: an empty stub
# stands in for it here. Nothing built here runs.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda_sources: nvcc not found" >&2; exit 1; }
CUDA_INCLUDE=${CUDA_INCLUDE:-$(dirname "$(dirname "$(command -v "$NVCC")")")/include}
[ -f "$CUDA_INCLUDE/cuda_runtime.h" ] || CUDA_INCLUDE=/usr/local/cuda/include
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in csrc/cuda/*.cu; do
  "$NVCC" -arch=sm_90 -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -c "$f" -o "$work/$(basename "$f").o"
  echo "nvcc sm_90: $f ok"
done
torch_include=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
mkdir -p "$work/stubs/c10/cuda/impl"
echo "#pragma once" > "$work/stubs/c10/cuda/impl/cuda_cmake_macros.h"
for f in csrc/cuda/*.cpp; do
  g++ -std=c++17 -fsyntax-only -Wall -DVOCABSEM_WITH_CUDA -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" \
    -isystem "$CUDA_INCLUDE" -isystem "$work/stubs" -Icsrc -Icsrc/cuda $(python3-config --includes) "$f"
  echo "g++ syntax (CUDA glue): $f ok"
done
