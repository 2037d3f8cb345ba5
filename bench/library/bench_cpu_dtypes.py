"""The cross-entropy on the CPU in fp32 and bf16 at the SmolLM2 and Llama-3 head shapes (fp16 at
SmolLM2's): the cpu backend (its default plan, and the three-GEMM row plan forced) against the
naive path in the same dtype, torch.compile of it, ``F.linear_cross_entropy`` and the three-GEMM floor, one run.
Time by pytest-benchmark; peak extra memory in a fresh process (peak_memory.py); the CPU's ISA
and oneDNN's choice are in the JSON's machine info (cpu_isa.py).

    python -m pytest bench/library/bench_cpu_dtypes.py --benchmark-enable --benchmark-only \\
        --benchmark-json=bench/results/cpu-dtypes.json
    python bench/library/summarize.py bench/results/cpu-dtypes.json --out bench/results/cpu-dtypes.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import peak_memory  # noqa: E402
import workloads  # noqa: E402

CONTENDERS = ["reference", "compiled_reference", "linear_cross_entropy", "gemm_floor", "cpu", "cpu_rows"]
ROUNDS = {"smollm2": 3, "llama3": 2}


# fp16 has no native GEMM on these CPUs (cpu_isa.py): measured at the small head only
CASES = [("smollm2", "fp32"), ("smollm2", "bf16"), ("smollm2", "fp16"), ("llama3", "fp32"), ("llama3", "bf16")]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0]}-{p[1]}")
def inputs(request):
    shape_name, dtype = request.param
    shape = workloads.SHAPES[shape_name]
    return shape, dtype, workloads.make_inputs(shape, workloads.DTYPES[dtype])


@pytest.mark.parametrize("contender", CONTENDERS)
def test_cross_entropy(benchmark, inputs, contender):
    shape, dtype, (hidden, bases, targets) = inputs
    if contender == "cpu" and "cpu" not in workloads.BACKENDS:
        pytest.skip("the C++ extension is not built")
    benchmark.group = f"cross_entropy fwd+bwd {shape.name} N={shape.n} d={shape.d} V={shape.v} {dtype}"
    loss = benchmark.pedantic(workloads.cross_entropy_step, args=(contender, hidden, bases, targets),
                              rounds=ROUNDS[shape.name], warmup_rounds=1)
    if contender != "gemm_floor":  # every loss contender computes the same number
        expected = workloads.cross_entropy_step("reference", hidden, bases, targets, backward=False)
        tol = 1e-4 if dtype == "fp32" else 2e-2  # half-precision logits carry their rounding on every path
        if loss.dtype != torch.float32:  # a loss returned in the inputs' dtype: its own rounding too
            tol += torch.finfo(loss.dtype).eps * abs(expected.item())
        torch.testing.assert_close(loss.float(), expected.float(), rtol=tol, atol=tol)
    benchmark.extra_info.update(peak_memory.measure(contender, shape.name, "fwd+bwd", dtype))
    benchmark.extra_info["gemm_flops"] = 3 * shape.gemm_flops
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["rounds"] = ROUNDS[shape.name]
