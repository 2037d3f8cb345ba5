"""Bad input raises a ValueError / TypeError (RuntimeError for an unavailable backend) whose
message names the offending argument: one case per test, never an assert, a crash or a silent
wrong answer.

Mixed devices are exercised with the "meta" device against CPU tensors; the check is the same
device-agnostic comparison for CUDA, but a CUDA-vs-CPU mix itself is not covered on a machine
without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vf

from helpers import BACKENDS, make

N, D, V = 4, 5, 7


def _h(*shape, dtype=torch.float32, device="cpu"):
    return make(*(shape or (N, D)), dtype=dtype).to(device)


def _b(*shape, dtype=torch.float32, device="cpu"):
    return make(*(shape or (V, D)), dtype=dtype).to(device)


def _t(*shape, dtype=torch.long, device="cpu"):
    return torch.randint(0, V, shape or (N,)).to(dtype=dtype, device=device)


# The three ops that share the (hidden, bases) checks, called with otherwise-valid arguments.
PAIR_OPS = {
    "logits": lambda h, b, **kw: vf.similarity_logits(h, b, **kw),
    "cross_entropy": lambda h, b, **kw: vf.similarity_cross_entropy(h, b, torch.zeros(h.shape[:-1], dtype=torch.long)
                                                                    if isinstance(h, torch.Tensor) else _t(), **kw),
    "topk": lambda h, b, **kw: vf.similarity_topk(h, b, 1, **kw),
}

PAIR_CASES = [
    # (id, hidden factory, bases factory, extra kwargs, exception, message pattern)
    ("hidden-size-mismatch", lambda: _h(N, D), lambda: _b(V, D + 1), {}, ValueError,
     r"hidden size mismatch: hidden has d=5 but bases has d=6"),
    ("bases-1d", lambda: _h(), lambda: _b(V), {}, ValueError, r"bases must have shape \(V, d\)"),
    ("bases-3d", lambda: _h(), lambda: _b(2, V, D), {}, ValueError, r"bases must have shape \(V, d\)"),
    ("hidden-0d", lambda: torch.tensor(1.0), lambda: _b(), {}, ValueError, r"hidden must have shape \(\.\.\., d\)"),
    ("hidden-int", lambda: torch.ones(N, D, dtype=torch.int64), lambda: _b(), {}, TypeError,
     r"hidden must be float16, bfloat16, float32 or float64, got torch.int64"),
    ("bases-int", lambda: _h(), lambda: torch.ones(V, D, dtype=torch.int32), {}, TypeError, r"bases must be float"),
    ("hidden-complex", lambda: torch.ones(N, D, dtype=torch.complex64), lambda: _b(), {}, TypeError,
     r"hidden must be float.*complex64"),
    ("hidden-not-tensor", lambda: [[1.0] * D] * N, lambda: _b(), {}, TypeError, r"hidden must be a torch.Tensor"),
    ("dtype-mismatch", lambda: _h(), lambda: _b(dtype=torch.float64), {}, TypeError,
     r"hidden \(torch.float32\) and bases \(torch.float64\) must have the same dtype"),
    ("dtype-mismatch-bf16", lambda: _h(dtype=torch.bfloat16), lambda: _b(), {}, TypeError,
     r"hidden \(torch.bfloat16\) and bases \(torch.float32\)"),
    ("empty-vocabulary", lambda: _h(), lambda: _b(0, D), {}, ValueError, r"bases is empty.*V >= 1"),
    ("mixed-devices", lambda: _h(), lambda: _b(device="meta"), {}, ValueError,
     r"one device: hidden on cpu, bases on meta"),
    ("eps-zero", lambda: _h(), lambda: _b(), dict(eps=0.0), ValueError, r"eps must be > 0"),
    ("eps-negative", lambda: _h(), lambda: _b(), dict(eps=-1e-8), ValueError, r"eps must be > 0"),
    ("scale-string", lambda: _h(), lambda: _b(), dict(scale="2"), TypeError, r"scale must be a real number"),
    ("scale-nan", lambda: _h(), lambda: _b(), dict(scale=float("nan")), ValueError, r"scale must not be NaN"),
    ("normalize-not-bool", lambda: _h(), lambda: _b(), dict(normalize=1), TypeError, r"normalize must be a bool"),
    ("impl-unknown", lambda: _h(), lambda: _b(), dict(impl="fast"), ValueError, r"impl must be one of .*'fast'"),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
@pytest.mark.parametrize("op", PAIR_OPS.keys())
def test_pair_checks(op, case):
    _, hidden, bases, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        PAIR_OPS[op](hidden(), bases(), **kwargs)


@pytest.mark.parametrize("impl", ["cuda", "triton"])
@pytest.mark.parametrize("op", PAIR_OPS.keys())
def test_gpu_impl_on_cpu_tensors_raises_runtime_error(op, impl):
    """An explicit backend that cannot run raises RuntimeError saying why: on this machine either
    the backend is unavailable, or (where it is) the tensors are on the CPU."""
    with pytest.raises(RuntimeError, match=rf"impl='{impl}' (is not available: \S.*|runs on CUDA tensors only)"):
        PAIR_OPS[op](_h(), _b(), impl=impl)


@pytest.mark.skipif("triton" in BACKENDS, reason="triton is available here; the unavailable message is untestable")
def test_unavailable_triton_says_why():
    reason = r"(no CUDA GPU \(set TRITON_INTERPRET=1|triton is not installed)"
    with pytest.raises(RuntimeError, match=rf"impl='triton' is not available: {reason}"):
        vf.similarity_cross_entropy(_h(), _b(), _t(), impl="triton")


# --- cross-entropy ---------------------------------------------------------------------------------
CE_CASES = [
    ("target-equal-V", lambda: torch.tensor([0, 1, V, 2]), {}, ValueError,
     rf"targets must lie in \[0, V={V}\) or equal ignore_index=-100; found {V}"),
    ("target-negative", lambda: torch.tensor([0, -1, 3, 2]), {}, ValueError,
     r"targets must lie in \[0, V=7\).*found -1"),
    ("target-minus100-not-ignored", lambda: torch.tensor([0, -100, 3, 2]), dict(ignore_index=-1), ValueError,
     r"targets must lie in .*ignore_index=-1; found -100"),
    ("targets-float", lambda: _t(dtype=torch.float32), {}, TypeError, r"targets must be an integer tensor"),
    ("targets-bool", lambda: _t(dtype=torch.bool), {}, TypeError, r"targets must be an integer tensor"),
    ("targets-not-tensor", lambda: [0, 1, 2, 3], {}, TypeError, r"targets must be a torch.Tensor"),
    ("targets-wrong-shape", lambda: _t(N, 1), {}, ValueError, r"targets must have shape hidden.shape\[:-1\] = \(4,\)"),
    ("targets-too-long", lambda: _t(N + 1), {}, ValueError, r"targets must have shape"),
    ("targets-other-device", lambda: _t(device="meta"), {}, ValueError, r"hidden on cpu, targets on meta"),
    ("reduction-unknown", _t, dict(reduction="avg"), ValueError, r"reduction must be one of .*'avg'"),
    ("reduction-none-object", _t, dict(reduction=None), ValueError, r"reduction must be one of"),
    ("label-smoothing-negative", _t, dict(label_smoothing=-0.1), ValueError,
     r"label_smoothing must lie in \[0.0, 1.0\]"),
    ("label-smoothing-above-1", _t, dict(label_smoothing=1.1), ValueError, r"label_smoothing must lie in \[0.0, 1.0\]"),
    ("ignore-index-float", _t, dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
]


@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_checks(impl, case):
    _, targets, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        vf.similarity_cross_entropy(_h(), _b(), targets(), impl=impl, **kwargs)


@pytest.mark.parametrize("impl", BACKENDS)
def test_out_of_range_target_with_leading_dims_and_tiny_tiles(impl):
    """The range check sees every target, not just a first chunk's (V + 5 sits in the last row)."""
    from vocabsem_fast.backends.tiles import tile_config  # noqa: PLC0415

    targets = torch.randint(0, V, (3, 5))
    targets[2, 4] = V + 5
    with tile_config(max_elements=16, max_rows=2, min_columns=2), pytest.raises(ValueError, match=rf"found {V + 5}"):
        vf.similarity_cross_entropy(_h(3, 5, D), _b(), targets, impl=impl)


# --- top-k -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,exc,pattern", [
    (0, ValueError, rf"k must lie in \[1, {V}\], got 0"),
    (V + 1, ValueError, rf"k must lie in \[1, {V}\], got {V + 1}"),
    (-1, ValueError, r"k must lie in"),
    (2.0, TypeError, r"k must be an int"),
    (True, TypeError, r"k must be an int"),
], ids=["k0", "k-V+1", "k-negative", "k-float", "k-bool"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_topk_k_out_of_range(impl, k, exc, pattern):
    with pytest.raises(exc, match=pattern):
        vf.similarity_topk(_h(), _b(), k, impl=impl)


# --- assign ----------------------------------------------------------------------------------------
ASSIGN_CASES = [
    ("points-1d", lambda: _h(D), lambda: _b(), {}, ValueError, r"points and centroids must be \(N, d\) and \(K, d\)"),
    ("centroids-1d", lambda: _h(), lambda: _b(D), {}, ValueError, r"points and centroids must be"),
    ("points-4d", lambda: _h(2, 2, N, D), lambda: _b(2, 2, V, D), {}, ValueError, r"points and centroids must be"),
    ("batched-points-2d-centroids", lambda: _h(2, N, D), lambda: _b(), {}, ValueError, r"points and centroids must be"),
    ("batch-size-mismatch", lambda: _h(2, N, D), lambda: _b(3, V, D), {}, ValueError,
     r"points and centroids must have the same batch size, got 2 and 3"),
    ("hidden-size-mismatch", lambda: _h(), lambda: _b(V, D + 2), {}, ValueError,
     r"points has d=5 but centroids has d=7"),
    ("no-centroids", lambda: _h(), lambda: _b(0, D), {}, ValueError, r"centroids is empty"),
    ("points-int", lambda: torch.ones(N, D, dtype=torch.int64), lambda: _b(), {}, TypeError, r"points must be float"),
    ("centroids-complex", lambda: _h(), lambda: torch.ones(V, D, dtype=torch.complex64), {}, TypeError,
     r"centroids must be float"),
    ("dtype-mismatch", lambda: _h(dtype=torch.float16), lambda: _b(), {}, TypeError,
     r"points \(torch.float16\) and centroids \(torch.float32\) must have the same dtype"),
    ("mixed-devices", lambda: _h(device="meta"), lambda: _b(), {}, ValueError, r"points on meta, centroids on cpu"),
    ("temperature-zero", lambda: _h(), lambda: _b(), dict(temperature=0.0), ValueError, r"temperature must be > 0"),
    ("temperature-negative", lambda: _h(), lambda: _b(), dict(temperature=-1.0), ValueError,
     r"temperature must be > 0"),
    ("temperature-string", lambda: _h(), lambda: _b(), dict(temperature="1"), TypeError, r"temperature must be a real"),
    ("hard-not-bool", lambda: _h(), lambda: _b(), dict(hard="yes"), TypeError, r"hard must be a bool"),
    ("eps-zero", lambda: _h(), lambda: _b(), dict(eps=0), ValueError, r"eps must be > 0"),
    ("impl-unknown", lambda: _h(), lambda: _b(), dict(impl="gpu"), ValueError, r"impl must be one of"),
]


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("case", ASSIGN_CASES, ids=[c[0] for c in ASSIGN_CASES])
def test_assign_checks(case, hard):
    _, points, centroids, kwargs, exc, pattern = case
    kwargs = {"hard": hard, **kwargs}
    with pytest.raises(exc, match=pattern):
        vf.assign(points(), centroids(), **kwargs)


# --- kmeans ----------------------------------------------------------------------------------------
KMEANS_CASES = [
    ("k-zero", lambda: _h(10, D), dict(k=0), ValueError, r"k must lie in \[1, 10\], got 0"),
    ("k-above-N", lambda: _h(10, D), dict(k=11), ValueError, r"k must lie in \[1, 10\], got 11"),
    ("k-float", lambda: _h(10, D), dict(k=2.0), TypeError, r"k must be an int"),
    ("metric-unknown", lambda: _h(10, D), dict(k=2, metric="manhattan"), ValueError,
     r"metric must be one of \('cosine', 'l2'\), got 'manhattan'"),
    ("iters-negative", lambda: _h(10, D), dict(k=2, iters=-1), ValueError, r"iters must lie in \[0, None\]"),
    ("iters-float", lambda: _h(10, D), dict(k=2, iters=2.5), TypeError, r"iters must be an int"),
    ("seed-float", lambda: _h(10, D), dict(k=2, seed=0.5), TypeError, r"seed must be an int"),
    ("points-3d", lambda: _h(2, 10, D), dict(k=2), ValueError, r"points must have shape \(N, d\)"),
    ("points-1d", lambda: _h(10), dict(k=2), ValueError, r"points must have shape \(N, d\)"),
    ("points-int", lambda: torch.ones(10, D, dtype=torch.int64), dict(k=2), TypeError, r"points must be float"),
    ("points-empty", lambda: _h(0, D), dict(k=1), ValueError, r"points is empty"),
]


@pytest.mark.parametrize("case", KMEANS_CASES, ids=[c[0] for c in KMEANS_CASES])
def test_kmeans_checks(case):
    _, points, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        vf.kmeans(points(), **kwargs)


@pytest.mark.parametrize("impl", ["fast", "cuda", "triton"])
def test_kmeans_impl_checked(impl):
    exc = ValueError if impl == "fast" else RuntimeError
    with pytest.raises(exc, match=rf"impl.*{impl}"):
        vf.kmeans(_h(10, D), 2, impl=impl)


# --- empty batches are valid -----------------------------------------------------------------------
@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_batches_are_valid(impl):
    hidden, bases = _h(0, D), _b()
    assert vf.similarity_logits(hidden, bases, impl=impl).shape == (0, V)
    assert vf.similarity_cross_entropy(hidden, bases, _t(0), impl=impl).item() == 0.0
    assert vf.similarity_topk(hidden, bases, V, impl=impl)[0].shape == (0, V)
    assert vf.assign(hidden, bases, impl=impl).shape == (0, V)
    assert vf.assign(hidden, bases, hard=True, impl=impl)[0].shape == (0,)
    assert vf.assign(_h(0, 3, D), _b(0, V, D), hard=True, impl=impl)[0].shape == (0, 3)
    assert vf.assign(_h(0, 3, D), _b(0, V, D), impl=impl).shape == (0, 3, V)


@pytest.mark.parametrize("call,error,match", [
    (lambda: vf.similarity_cross_entropy(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0, 1, 2])),
     ValueError, "d=0"),
    (lambda: vf.similarity_topk(torch.randn(3, 0), torch.randn(5, 0), 2), ValueError, "d=0"),
    (lambda: vf.assign(torch.randn(3, 0), torch.randn(5, 0), hard=True), ValueError, "d=0"),
    (lambda: vf.kmeans(torch.randn(3, 0), 2), ValueError, "d=0"),
    (lambda: vf.similarity_logits(torch.randn(3, 4).to_sparse(), torch.randn(5, 4)), TypeError,
     "hidden must be a dense"),
    (lambda: vf.similarity_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).to_sparse_csr(),
                                         torch.tensor([0, 1, 2])), TypeError, "bases must be a dense"),
    (lambda: vf.kmeans(torch.tensor([[float("nan"), 1.0], [1.0, 2.0], [3.0, 4.0]]), 2), ValueError,
     "points contains NaN or inf"),
    (lambda: vf.semantic_bases(torch.tensor([[float("inf"), 1.0], [1.0, 2.0], [3.0, 4.0]])), ValueError,
     "lm_head_weight contains NaN or inf"),
], ids=["ce-d0", "topk-d0", "hard-d0", "kmeans-d0", "sparse-hidden", "sparse-bases", "kmeans-nan", "bases-inf"])
def test_degenerate_inputs_are_named(call, error, match):
    """d = 0 gave a reshape error (and hard assignment / k-means returned silently), sparse inputs
    failed deep inside, NaN points a multinomial error, a NaN head a LinAlgError."""
    with pytest.raises(error, match=match):
        call()
