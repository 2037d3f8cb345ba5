"""CPU benchmarks beyond the foundation suite: the Llama-3 head shape, torch.compile of the
reference, and hard assignment against faiss-cpu. Same method as bench_foundation.py (time by
pytest-benchmark, peak memory in a fresh process).

    python -m pytest bench/library/bench_cpu_large.py --benchmark-enable --benchmark-only \
        --benchmark-json=bench/results/cpu-large.json
    python bench/library/summarize.py bench/results/cpu-large.json --out bench/results/cpu-large.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import peak_memory  # noqa: E402
import workloads  # noqa: E402

LLAMA = workloads.SHAPES["llama3"]
SMOL = workloads.SHAPES["smollm2"]


@pytest.fixture(scope="module")
def llama_inputs():
    return workloads.make_inputs(LLAMA)


@pytest.mark.parametrize("contender", workloads.LOSS_CONTENDERS)
def test_cross_entropy_llama3(benchmark, llama_inputs, contender):
    benchmark.group = f"cross_entropy fwd+bwd {LLAMA.name} N={LLAMA.n} d={LLAMA.d} V={LLAMA.v} fp32"
    hidden, bases, targets = llama_inputs
    benchmark.pedantic(workloads.cross_entropy_step, args=(contender, hidden, bases, targets),
                       rounds=2, warmup_rounds=1)
    benchmark.extra_info.update(peak_memory.measure(contender, LLAMA.name, "fwd+bwd"))
    benchmark.extra_info["gemm_flops"] = 3 * LLAMA.gemm_flops
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("contender", ["reference", "compiled_reference", *workloads.BACKENDS])
def test_cross_entropy_compiled_reference(benchmark, contender):
    benchmark.group = f"cross_entropy fwd+bwd vs torch.compile {SMOL.name} N={SMOL.n} d={SMOL.d} V={SMOL.v} fp32"
    hidden, bases, targets = workloads.make_inputs(SMOL)
    loss = benchmark.pedantic(workloads.cross_entropy_step, args=(contender, hidden, bases, targets),
                              rounds=3, warmup_rounds=1)
    expected = workloads.cross_entropy_step("reference", hidden, bases, targets, backward=False)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(peak_memory.measure(contender, SMOL.name, "fwd+bwd"))
    benchmark.extra_info["gemm_flops"] = 3 * SMOL.gemm_flops
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("contender", ["reference", "faiss", *workloads.BACKENDS])
def test_hard_assign(benchmark, contender):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    a = workloads.ASSIGNMENT
    benchmark.group = f"hard assignment N={a['n']} K={a['k']} d={a['d']} fp32"
    points, centroids = workloads.assignment_inputs()
    indices, _ = benchmark.pedantic(workloads.hard_assign_step, args=(contender, points, centroids),
                                    rounds=3, warmup_rounds=1)
    expected, _ = workloads.hard_assign_step("reference", points, centroids)
    assert (indices == expected).float().mean() > 0.999  # the same answers, up to float ties
    benchmark.extra_info.update(peak_memory.measure(contender, "smollm2", "hard_assign"))
    benchmark.extra_info["gemm_flops"] = 2.0 * a["n"] * a["k"] * a["d"]
    benchmark.extra_info["threads"] = torch.get_num_threads()
