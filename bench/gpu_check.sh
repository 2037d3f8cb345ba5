#!/usr/bin/env bash
# The one-shot GPU check: a fresh CUDA machine, no network, a few minutes. Every step has a time
# budget, reports itself, and shows the tail of its log when it fails; a failed step never ends
# the run: the next one still runs with what there is.
#
#   1. carried wheels (.whl/*.whl beside the checkout, fetched by bench/fetch_gpu_wheels.sh)
#      installed into /tmp/site; the tools the steps need (pytest, ninja) checked
#   2. the package built for the one GPU architecture present, the CUDA extension when nvcc and
#      torch's CUDA agree; if that build fails, again without CUDA (the Triton backend is still
#      checked), then without any extension (the package imports from the checkout)
#   3. bench/library/gpu_check.py: GPU tests against the reference, NCCL, benchmarks
#
#   bash bench/gpu_check.sh [--quick]     on the GPU machine
#   bash bench/gpu_check.sh --rehearse    without a GPU: every step runs, the build's CUDA attempt
#                                         fails on purpose (the fallback runs), the GPU tests and
#                                         the benchmarks (tiny CPU shapes) run the Triton kernels
#                                         under its interpreter
# Writes gpu-check.json and one log per step (gpu-check-*.log) to $OUT, or bench/results.
# VOCABSEM_GPU_CHECK_SECONDS: the whole run's budget (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${VOCABSEM_GPU_CHECK_SECONDS:-480}
results=${OUT:-bench/results}
mkdir -p "$results"
rehearse=0
check_args=()
for arg in "$@"; do
  if [ "$arg" = --rehearse ]; then rehearse=1; else check_args+=("$arg"); fi
done

left() { echo $((TOTAL - SECONDS)); }
say() { echo "[gpu_check ${SECONDS}s] $*"; }

# run_step NAME SECONDS COMMAND...: output to $results/gpu-check-NAME.log, at most SECONDS (and
# never past the run's budget); on failure the log's last 40 lines are shown.
run_step() {
  local name=$1 limit=$2 log="$results/gpu-check-$1.log"
  shift 2
  if ((limit > $(left) - 5)); then limit=$(($(left) - 5)); fi
  if ((limit < 10)); then
    say "$name: skipped, the time budget is spent"
    return 124
  fi
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  if ((rc == 0)); then
    say "$name: ok"
  else
    say "$name: FAILED (exit $rc$( ((rc == 124)) && echo ", over its ${limit} s")); the end of $log:"
    tail -n 40 "$log" | sed 's/^/    /'
  fi
  return $rc
}

# --- 1. carried wheels and tools --------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels 90 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  say "wheels: none carried (.whl/ is empty)"
fi
if ! command -v ninja >/dev/null; then  # the pip package has the binary where PATH may not look
  ninja_bin=$("$PY" -c "import ninja, os; print(ninja.BIN_DIR)" 2>/dev/null) && export PATH="$ninja_bin:$PATH"
fi
command -v ninja >/dev/null && say "ninja: $(ninja --version)" || say "ninja: missing (the build runs serially)"
"$PY" -c "import pytest" 2>/dev/null || say "pytest: MISSING: the correctness step cannot run (carry its wheel)"
"$PY" -c "import pytest_benchmark" 2>/dev/null ||
  say "pytest-benchmark: missing (the check's pytest runs override the project's addopts, which need it)"

read -r torch_version torch_cuda arch < <("$PY" -c "
import torch
cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(torch.__version__, torch.version.cuda or 'none', f'{cc[0]}{cc[1]}' if cc else 'none')" 2>/dev/null ||
  echo "missing none none")
nvcc_cuda=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
say "torch $torch_version (CUDA $torch_cuda), nvcc ${nvcc_cuda:-missing}, GPU architecture sm_$arch"

# --- 2. build ---------------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
install=("$PY" -m pip install --no-build-isolation --no-deps -v -e .)
cuda_reason=""
if ((rehearse)); then
  cuda_reason="rehearsal"
elif [ "$torch_cuda" = none ]; then
  cuda_reason="torch has no CUDA"
elif [ -z "$nvcc_cuda" ]; then
  cuda_reason="no nvcc"
elif [ "${nvcc_cuda%%.*}" != "${torch_cuda%%.*}" ]; then
  cuda_reason="nvcc $nvcc_cuda and torch's CUDA $torch_cuda differ in major version"
fi
built=""
if [ -z "$cuda_reason" ]; then
  run_step build 300 env VOCABSEM_FORCE_CUDA=1 VOCABSEM_CUDA_ARCHS="$arch" "${install[@]}" && built="with CUDA"
elif ((rehearse)); then  # the CUDA build cannot succeed here: it rehearses the failure and the fallback
  run_step build 240 env VOCABSEM_FORCE_CUDA=1 VOCABSEM_CUDA_ARCHS=90 "${install[@]}" && built="with CUDA"
else
  say "build: the CUDA extension is left out ($cuda_reason)"
fi
if [ -z "$built" ]; then
  run_step build-cpu 240 env VOCABSEM_NO_CUDA=1 "${install[@]}" && built="without CUDA"
fi
if [ -z "$built" ]; then
  run_step build-none 120 env VOCABSEM_NO_EXTENSION=1 "${install[@]}" && built="without an extension"
fi
if [ -z "$built" ]; then
  built="not installed: imported from the checkout"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
say "package: built $built"

# --- 3. tests and benchmarks ------------------------------------------------------------------
export VOCABSEM_GPU_CHECK_SECONDS=$(($(left) - 10))
export VOCABSEM_GPU_CHECK_BUILD="$built"
if ((rehearse)); then
  check_args+=(--rehearse)
  export TRITON_INTERPRET=1  # the Triton backend's launchers and kernels run too, on the CPU
fi
log="$results/gpu-check-run.log"
timeout $(($(left) - 5)) "$PY" -u bench/library/gpu_check.py --out "$results/gpu-check.json" "${check_args[@]}" 2>&1 |
  tee "$log"
rc=${PIPESTATUS[0]}
say "done (exit $rc)"
exit "$rc"
