"""The GPU backends (triton, cuda) against the reference, on the device they run on.

On a CUDA machine ``python -m pytest tests/gpu_backend_cases.py`` checks both on the GPU
(bench/gpu_check.py runs it). On the CPU, test_triton_interpreter.py runs it in a child process
under TRITON_INTERPRET=1, where only the triton backend is available (the interpreter must be
chosen before triton compiles anything, and it is slow, so these cases are few and small).

Shapes are odd and span several row and vocabulary blocks of the kernels (64 x 64 tiles)."""

from __future__ import annotations

import nan_and_overflow_cases
import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import backends
from vocabsem_fast import reference as ref

from helpers import assert_error_bound, make, make_targets

GPU_IMPLS = [impl for impl in ("triton", "cuda") if backends.unavailable_reason(impl) is None]
pytestmark = pytest.mark.skipif(not GPU_IMPLS, reason="no GPU backend is available here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"N37-d59-V1025": (37, 59, 1025), "N70-d130-V301": (70, 130, 301), "N5-d1-V200": (5, 1, 200)}
LOSSES = {  # (reduction, label_smoothing, normalize, scale, class weights and z-loss)
    "mean": ("mean", 0.0, True, 20.0, False),
    "sum-smooth": ("sum", 0.1, True, 20.0, False),
    "none-raw": ("none", 0.0, False, 0.5, False),
    "mean-weighted-smooth-z": ("mean", 0.1, True, 20.0, True),
}


def _slack(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_cross_entropy_and_gradients(impl, shape, dtype, loss):
    n, d, v = SHAPES[shape]
    reduction, smoothing, normalize, scale, options = LOSSES[loss]
    dt = DTYPES[dtype]
    extra = dict(weight=torch.rand(v, device=DEVICE) + 0.1, z_loss=1e-3) if options else {}
    h64, b64 = make(n, d, dtype=torch.float64), make(v, d, dtype=torch.float64)
    if d == 1:
        # normalised d = 1 vectors are the constants +-1: the true gradients are 0 and what any
        # float32 implementation returns is rounding noise times 1/|x|; keep |x| >= 0.5 to bound it
        h64, b64 = (torch.where(x >= 0, x + 0.5, x - 0.5) for x in (h64, b64))
    targets = make_targets((n,), v).to(DEVICE)
    upstream = torch.rand(n, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    outs = {}
    for name, x_dtype, use in (("fused", dt, impl), ("ref", dt, None), ("truth", torch.float64, None)):
        h = h64.to(DEVICE, x_dtype).requires_grad_(True)
        b = b64.to(DEVICE, x_dtype).requires_grad_(True)
        kwargs = dict(scale=scale, normalize=normalize, reduction=reduction, label_smoothing=smoothing, **extra)
        out = (vs.similarity_cross_entropy(h, b, targets, impl=use, **kwargs) if use
               else ref.similarity_cross_entropy(h, b, targets, **kwargs))
        (out.double() * upstream.to(DEVICE)).sum().backward()
        outs[name] = (out.detach().cpu(), h.grad.cpu(), b.grad.cpu())
    for i, part in enumerate(("loss", "grad hidden", "grad bases")):
        assert_error_bound(outs["fused"][i].double(), outs["ref"][i].double(), outs["truth"][i],
                           name=f"{impl} {shape} {dtype} {loss} {part}", slack=_slack(dt))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_forward_of_a_few_rows_over_many_vocabulary_splits(impl, n, dtype):
    """Decoding and scoring: few rows, the vocabulary split over many programs and merged; loss
    and log-sum-exp without gradients, ignored rows included."""
    dt = DTYPES[dtype]
    h64, b64 = make(n, 37, dtype=torch.float64), make(5003, 37, dtype=torch.float64)
    targets = make_targets((n,), 5003, ignored=0.3).to(DEVICE)
    results = {}
    for name, x_dtype, use in (("fused", dt, impl), ("ref", dt, None), ("truth", torch.float64, None)):
        h, b = h64.to(DEVICE, x_dtype), b64.to(DEVICE, x_dtype)
        kwargs = dict(scale=20.0, reduction="none", label_smoothing=0.1)
        with torch.no_grad():
            if use:
                loss, lse = vs.similarity_cross_entropy(h, b, targets, impl=use, return_lse=True, **kwargs)
            else:
                loss = ref.similarity_cross_entropy(h, b, targets, **kwargs)
                lse = torch.logsumexp(ref.similarity_logits(h, b, scale=20.0).to(loss.dtype), dim=-1)
        results[name] = (loss.cpu().double(), lse.cpu().double())
    for i, part in enumerate(("loss", "lse")):
        assert_error_bound(results["fused"][i], results["ref"][i], results["truth"][i],
                           name=f"{impl} n={n} {dtype} {part}", slack=_slack(dt))


@pytest.mark.parametrize("k", [1, 5, 17])
@pytest.mark.parametrize("shape", [(41, 67, 333), (2, 67, 3001)], ids=["N41-V333", "N2-V3001"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_topk(impl, k, dtype, shape):
    dt = DTYPES[dtype]
    n, d, v = shape
    h64, b64 = make(n, d, dtype=torch.float64), make(v, d, dtype=torch.float64)
    values, indices = vs.similarity_topk(h64.to(DEVICE, dt), b64.to(DEVICE, dt), k=k, scale=3.0, impl=impl)
    ref_values, _ = ref.similarity_topk(h64.to(dt), b64.to(dt), k=k, scale=3.0)
    truth = ref.similarity_logits(h64, b64, scale=3.0)
    true_values = truth.topk(k, dim=1).values
    assert_error_bound(values.cpu().double(), ref_values.double(), true_values, name="top-k values",
                       slack=_slack(dt))
    # the indices name columns whose true scores are the top values (robust to near ties)
    assert_error_bound(truth.gather(1, indices.cpu()), ref_values.double(), true_values, name="top-k indices",
                       slack=_slack(dt))
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "top-k values are not sorted"
    rows = indices.cpu().tolist()
    assert all(len(set(row)) == k for row in rows), f"repeated top-k indices: {rows}"
    # where a true score stands apart from its neighbours in the ranking by more than the kernel's
    # rounding (scores of the inputs as rounded to dt, in float64), its rank holds the same index
    top = ref.similarity_logits(h64.to(dt).double(), b64.to(dt).double(), scale=3.0).topk(k + 1, dim=1)
    gaps = top.values[:, :-1] - top.values[:, 1:]
    above = torch.cat([torch.full((n, 1), float("inf"), dtype=gaps.dtype), gaps[:, :-1]], dim=1)
    apart = (gaps > 1e-3) & (above > 1e-3)
    assert bool(apart.any()), "no rank stands apart: the index check would be empty"
    assert torch.equal(indices.cpu()[apart], top.indices[:, :k][apart]), "top-k indices differ from the reference's"
    hard_idx, _ = vs.assign(h64.to(DEVICE, dt), b64.to(DEVICE, dt), hard=True, impl=impl)
    assert torch.equal(hard_idx.cpu(), indices[:, 0].cpu())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_batched_hard_assignment(impl, dtype, normalize):
    """B problems at once (one launch on the GPU) against the reference, each on its own."""
    dt = DTYPES[dtype]
    p64, c64 = make(3, 37, 59, dtype=torch.float64), make(3, 301, 59, dtype=torch.float64)
    indices, scores = vs.assign(p64.to(DEVICE, dt), c64.to(DEVICE, dt), hard=True, normalize=normalize, impl=impl)
    _, ref_scores = ref.assign(p64.to(dt), c64.to(dt), hard=True, normalize=normalize)
    truth = ref.assign(p64, c64, hard=True, normalize=normalize)[1]
    assert_error_bound(scores.cpu().double(), ref_scores.double(), truth, name="batched hard scores",
                       slack=_slack(dt))
    all_scores = (torch.nn.functional.normalize(p64, dim=-1) @ torch.nn.functional.normalize(c64, dim=-1).mT
                  if normalize else p64 @ c64.mT)
    # the chosen centroid's true score is the best one, up to the inputs' rounding
    assert_error_bound(all_scores.gather(2, indices.cpu()[..., None])[..., 0], ref_scores.double(), truth,
                       name="batched hard indices", slack=_slack(dt))


@pytest.mark.parametrize("k", [13, 200])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_soft_assign_and_gradients(impl, k, dtype):
    dt = DTYPES[dtype]
    p64, c64 = make(2, 37, 59, dtype=torch.float64), make(2, k, 59, dtype=torch.float64)
    upstream = torch.randn(2, 37, k, dtype=torch.float64)
    outs = {}
    for name, x_dtype, use in (("fused", dt, impl), ("ref", dt, None), ("truth", torch.float64, None)):
        p = p64.to(DEVICE, x_dtype).requires_grad_(True)
        c = c64.to(DEVICE, x_dtype).requires_grad_(True)
        out = (vs.assign(p, c, temperature=0.1, impl=use) if use else ref.assign(p, c, temperature=0.1))
        (out.double() * upstream.to(DEVICE)).sum().backward()
        outs[name] = (out.detach().cpu(), p.grad.cpu(), c.grad.cpu())
    for i, part in enumerate(("probabilities", "grad points", "grad centroids")):
        assert_error_bound(outs["fused"][i].double(), outs["ref"][i].double(), outs["truth"][i],
                           name=f"{impl} soft assign {dtype} k={k} {part}", slack=_slack(dt))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_nan_contract(impl, k):
    nan_and_overflow_cases.check_nan_topk(impl, DEVICE, k)
    nan_and_overflow_cases.check_nan_hard_assignment(impl, DEVICE)


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_overflowing_norms_score_zero(impl):
    nan_and_overflow_cases.check_overflow_scores_zero(impl, DEVICE)


@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_infinite_entries_give_nan_in_their_rows(impl):
    nan_and_overflow_cases.check_infinite_entries(impl, DEVICE)


def test_batched_triton_launches_in_chunks_match_the_reference(monkeypatch):
    """A batch beyond CUDA's 65535 programs on grid axes 1 and 2 is launched in chunks: with the
    chunk shrunk to two problems, five problems take three launches and still match."""
    if "triton" not in GPU_IMPLS:
        pytest.skip("the triton backend is not available")
    from vocabsem_fast.kernels import similarity

    monkeypatch.setattr(similarity, "MAX_GRID_YZ", 2)
    p64, c64 = make(5, 7, 19, dtype=torch.float64), make(5, 33, 19, dtype=torch.float64)
    points, centroids = p64.to(DEVICE, torch.float32), c64.to(DEVICE, torch.float32)
    indices, scores = vs.assign(points, centroids, hard=True, impl="triton")
    ref_indices, ref_scores = ref.assign(points.cpu(), centroids.cpu(), hard=True)
    torch.testing.assert_close(scores.cpu(), ref_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices.cpu(), ref_indices)
    probs = vs.assign(points, centroids, temperature=0.1, impl="triton")
    torch.testing.assert_close(probs.cpu(), ref.assign(points.cpu(), centroids.cpu(), temperature=0.1),
                               rtol=1e-5, atol=1e-6)
