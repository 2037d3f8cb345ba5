"""What class weights and the z-loss cost on the cpu backend: fwd+bwd at the SmolLM2 head shape
(fp32), plain loss against ``weight=``, ``z_loss=`` and ``weight=`` with label smoothing, beside
the naive path with the same options and the three-GEMM floor, one run. Class weights keep the
gradients formed in the forward pass (three GEMMs); a z-loss, or class weights with label
smoothing, take the recomputing backward (four).

    python -m pytest bench/library/bench_loss_options.py --benchmark-enable --benchmark-only \\
        --benchmark-json=bench/results/loss-options-cpu.json
    python bench/library/summarize.py bench/results/loss-options-cpu.json --out bench/results/loss-options-cpu.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vocabsem_fast as vs

sys.path.insert(0, str(Path(__file__).parent))
import workloads  # noqa: E402

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "z_loss": {"z_loss": 1e-4},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.1},
}


@pytest.fixture(scope="module")
def inputs():
    shape = workloads.SHAPES["smollm2"]
    hidden, bases, targets = workloads.make_inputs(shape, torch.float32)
    weight = torch.rand(shape.v, generator=torch.Generator().manual_seed(1)) + 0.5
    return shape, hidden, bases, targets, weight


def _step(impl, hidden, bases, targets, options):
    h, b = hidden.detach().requires_grad_(True), bases.detach().requires_grad_(True)
    kwargs = dict(scale=workloads.SCALE, **options)
    loss = (vs.reference.similarity_cross_entropy(h, b, targets, **kwargs) if impl == "reference"
            else vs.similarity_cross_entropy(h, b, targets, impl=impl, **kwargs))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("contender", ["reference", "cpu", "gemm_floor"])
@pytest.mark.parametrize("option", OPTIONS)
def test_loss_options(benchmark, inputs, option, contender):
    shape, hidden, bases, targets, weight = inputs
    if contender == "gemm_floor" and option != "plain":
        pytest.skip("the floor is the same for every option")
    options = {k: (weight if k == "weight" else v) for k, v in OPTIONS[option].items()}
    benchmark.group = f"cross_entropy fwd+bwd smollm2 fp32 {option}"
    benchmark.extra_info["gemm_flops"] = 3 * shape.gemm_flops  # what the floor does; the rates compare
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if contender == "gemm_floor":
        benchmark.pedantic(workloads.cross_entropy_step, args=("gemm_floor", hidden, bases, targets), rounds=3,
                           warmup_rounds=1)
        return
    loss = benchmark.pedantic(_step, args=(contender, hidden, bases, targets, options), rounds=3, warmup_rounds=1)
    if contender == "cpu":
        expected = vs.reference.similarity_cross_entropy(hidden, bases, targets, scale=workloads.SCALE, **options)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
