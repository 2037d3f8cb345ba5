"""CPU benchmarks of the similarity cross-entropy and top-k: every backend against the
materialising reference, same inputs, one run. Time by pytest-benchmark; peak extra memory of
the same workload in a fresh process (bench/library/peak_memory.py) goes into ``extra_info``.

    python -m pytest bench/library/bench_foundation.py --benchmark-enable --benchmark-only \
        --benchmark-json=bench/results/foundation-cpu.json
    python bench/library/summarize.py bench/results/foundation-cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import peak_memory  # noqa: E402
import workloads  # noqa: E402

SHAPE = workloads.SHAPES["smollm2"]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def inputs(request):
    return request.param, workloads.make_inputs(SHAPE, workloads.DTYPES[request.param])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("contender", workloads.LOSS_CONTENDERS)
def test_cross_entropy(benchmark, inputs, contender, mode):
    dtype, (hidden, bases, targets) = inputs
    benchmark.group = f"cross_entropy {mode} {SHAPE.name} N={SHAPE.n} d={SHAPE.d} V={SHAPE.v} {dtype}"
    loss = benchmark.pedantic(
        workloads.cross_entropy_step, args=(contender, hidden, bases, targets),
        kwargs={"backward": mode == "fwd+bwd"}, rounds=3, warmup_rounds=1,
    )
    if contender != "gemm_floor":  # every loss contender computes the same number
        expected = workloads.cross_entropy_step("reference", hidden, bases, targets, backward=False)
        tol = 1e-4 if dtype == "fp32" else 2e-2  # bf16 logits carry bf16 rounding on every path
        if loss.dtype != torch.float32:  # a loss returned in the inputs' dtype: its own rounding too
            tol += torch.finfo(loss.dtype).eps * abs(expected.item())
        torch.testing.assert_close(loss.float(), expected.float(), rtol=tol, atol=tol)
    gemms = 1 if mode == "fwd" else 3
    benchmark.extra_info.update(peak_memory.measure(contender, SHAPE.name, mode, dtype))
    benchmark.extra_info["gemm_flops"] = gemms * SHAPE.gemm_flops
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("contender", workloads.TOPK_CONTENDERS)
def test_topk(benchmark, inputs, contender):
    dtype, (hidden, bases, _) = inputs
    benchmark.group = f"topk k=5 {SHAPE.name} N={SHAPE.n} d={SHAPE.d} V={SHAPE.v} {dtype}"
    benchmark.pedantic(workloads.topk_step, args=(contender, hidden, bases), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(peak_memory.measure(contender, SHAPE.name, "topk", dtype))
    benchmark.extra_info["gemm_flops"] = SHAPE.gemm_flops


@pytest.mark.parametrize("contender", ["reference", *workloads.BACKENDS])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_soft_assign(benchmark, contender, dtype):
    a = workloads.SOFT_ASSIGN
    benchmark.group = f"soft assignment N={a['n']} K={a['k']} d={a['d']} {dtype}"
    points, centroids = workloads.soft_assign_inputs(workloads.DTYPES[dtype])
    probs = benchmark.pedantic(workloads.soft_assign_step, args=(contender, points, centroids), rounds=5,
                               warmup_rounds=1)
    expected = workloads.soft_assign_step("reference", points.double(), centroids.double())
    tol = 1e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(probs.double(), expected, rtol=tol, atol=tol)
    benchmark.extra_info["gemm_flops"] = 2.0 * a["n"] * a["k"] * a["d"]
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["rounds"] = 5
