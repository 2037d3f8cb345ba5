"""similarity_logits, similarity_cross_entropy and similarity_topk against ``vocabsem_fast.reference``,
for every available backend, on odd shapes, with tiny tiles that force many column chunks and row
blocks; float64 gradcheck; low-precision numerics judged against a float64 truth; NaN, zero
vectors and empty batches."""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends.tiles import tile_config

from helpers import (
    BACKENDS,
    assert_error_bound,
    assert_matches,
    leaf,
    make,
    make_targets,
    tile_shape_params,
    tiles,
)

FP32_TOL = 2e-5  # relative to max(1, max|expected|): float32 sums over d <= 130 and V <= 50257 terms

SIMILARITY_OPTIONS = [
    pytest.param(dict(), id="cos"),
    pytest.param(dict(scale=20.0), id="cos-scale20"),
    pytest.param(dict(normalize=False), id="dot"),
    pytest.param(dict(normalize=False, scale=0.25, eps=1e-3), id="dot-scale0.25"),
]


def _inputs(lead, d, v, dtype=torch.float32):
    hidden, bases = make(*lead, d, dtype=dtype), make(v, d, dtype=dtype)
    if d == 1:
        # With d = 1 the normalised vectors are +-1 and the gradients are rounding noise amplified
        # by 1/|x| (see _check_grads). Keep |x| >= 0.5 so that stays bounded (zero vectors have a test).
        hidden, bases = (torch.where(x >= 0, x + 0.5, x - 0.5) for x in (hidden, bases))
    return hidden.requires_grad_(True), bases.requires_grad_(True)


def _backward(out, upstream):
    (out * upstream).sum().backward()


def _check_grads(hidden, bases, rh, rb, options, row_l1, col_l1):
    """The backend's gradients (in ``hidden.grad``, ``bases.grad``) against the reference's (in
    ``rh.grad``, ``rb.grad``).

    With d = 1 and normalisation the true gradients are exactly 0 (the normalised vectors are the
    constants +-1) and what either float32 implementation returns is rounding noise: the projection
    ``(g - n (n . g)) / |x|`` of g, the gradient w.r.t. the normalised vector, a sum of terms
    ``scale * dL/dz * (+-1)``. There the check is that the backend's gradient is below 1e-5 (about
    80 float32 ulps) of ``scale * sum |dL/dz| / |x|``, the size of g's terms; ``row_l1`` (per
    hidden row) and ``col_l1`` (per basis, or one scalar bound for all) bound ``sum |dL/dz|``."""
    if hidden.shape[-1] == 1 and options.get("normalize", True):
        scale = abs(options.get("scale", 1.0))
        col_l1 = torch.as_tensor(col_l1, dtype=torch.float64)
        for name, grad, x, l1 in (("hidden", hidden.grad, hidden, torch.as_tensor(row_l1)[..., None]),
                                  ("bases", bases.grad, bases, col_l1.reshape(-1, 1) if col_l1.dim() else col_l1)):
            assert bool(grad.isfinite().all()), f"{name}.grad is not finite"
            bound = 1e-5 * scale * l1.double() / x.detach().double().abs()
            ratio = (grad.double().abs() / bound).nan_to_num(nan=0.0, posinf=float("inf"))
            assert bool((ratio <= 1).all()), (
                f"{name}.grad should vanish (d = 1, normalised): worst at {ratio.max().item():.3g} x the bound"
            )
        return
    assert_matches(hidden.grad, rh.grad, tol=FP32_TOL, name="hidden.grad")
    assert_matches(bases.grad, rb.grad, tol=FP32_TOL, name="bases.grad")


def _cross_entropy_weights(targets, upstream, reduction, ignore_index):
    """Each row's weight in the loss (its upstream gradient): |dL/dz| sums to at most 2x it per row."""
    valid = (targets != ignore_index).double()
    weights = valid * upstream.double().abs()
    return weights / valid.sum().clamp_min(1) if reduction == "mean" else weights


# --- similarity_logits ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", SIMILARITY_OPTIONS)
@pytest.mark.parametrize("tile,shape", tile_shape_params())
@pytest.mark.parametrize("impl", BACKENDS)
def test_logits_matches_reference(impl, tile, shape, options):
    lead, d, v = shape
    hidden, bases = _inputs(lead, d, v)
    rh, rb = leaf(hidden), leaf(bases)
    with tiles(tile):
        out = vf.similarity_logits(hidden, bases, impl=impl, **options)
        expected = ref.similarity_logits(rh, rb, **options)
        assert out.dtype == torch.float32 and out.shape == (*lead, v)
        assert_matches(out, expected, tol=FP32_TOL, name="logits")
        upstream = torch.randn_like(expected)
        _backward(out, upstream)
        _backward(expected, upstream)
        if options.get("normalize", True):
            l1 = upstream.abs().double()
            _check_grads(hidden, bases, rh, rb, options, l1.sum(-1), l1.reshape(-1, v).sum(0))
            return
        # dot products: each gradient is a sum over V (or N) terms that can cancel far below their
        # size, so two float32 sums differ by more than a tolerance relative to the result; both
        # are held to the reference in float64 instead, the backend within twice the float32 reference's error
        th, tb = leaf(hidden, torch.float64), leaf(bases, torch.float64)
        _backward(ref.similarity_logits(th, tb, **options), upstream.double())
        assert_error_bound(hidden.grad, rh.grad, th.grad, name="hidden.grad", slack=FP32_TOL)
        assert_error_bound(bases.grad, rb.grad, tb.grad, name="bases.grad", slack=FP32_TOL)


# --- similarity_cross_entropy ---------------------------------------------------------------------
def _check_cross_entropy(impl, tile, lead, d, v, *, upstream_scale=1.7, **kwargs):
    hidden, bases = _inputs(lead, d, v)
    rh, rb = leaf(hidden), leaf(bases)
    targets = make_targets(lead, v, ignore_index=kwargs.get("ignore_index", -100))
    with tiles(tile):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, impl=impl, **kwargs)
        expected = ref.similarity_cross_entropy(rh, rb, targets, **kwargs)
        assert loss.dtype == torch.float32 and loss.shape == expected.shape
        assert_matches(loss, expected, tol=FP32_TOL, name="loss")
        upstream = torch.rand_like(expected) + 0.5 if expected.dim() else torch.tensor(upstream_scale)
        _backward(loss, upstream)
        _backward(expected, upstream)
        weights = _cross_entropy_weights(targets, upstream, kwargs.get("reduction", "mean"),
                                         kwargs.get("ignore_index", -100))
        _check_grads(hidden, bases, rh, rb, kwargs, 2 * weights, 2 * weights.sum())
    return loss, expected


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile,shape", tile_shape_params())
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_matches_reference(impl, tile, shape, reduction, label_smoothing):
    lead, d, v = shape
    loss, _ = _check_cross_entropy(
        impl, tile, lead, d, v, scale=20.0, reduction=reduction, label_smoothing=label_smoothing
    )
    assert loss.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("options", SIMILARITY_OPTIONS + [pytest.param(dict(scale=1.0, eps=0.5), id="cos-eps0.5")])
@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_similarity_options(impl, tile, options):
    _check_cross_entropy(impl, tile, (37,), 59, 1025, label_smoothing=0.1, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_ignore_index_inside_vocabulary(impl, reduction):
    """An ignore_index that is a valid token id (here 2) is ignored, not scored."""
    loss, expected = _check_cross_entropy(impl, "tiny", (3, 5), 59, 7, ignore_index=2, reduction=reduction)
    if reduction == "none":
        assert bool((loss.detach()[expected.detach() == 0] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_all_targets_ignored(impl, tile, reduction):
    """Every target ignored: 0.0 (not NaN, which F.cross_entropy's "mean" gives) and zero gradients."""
    hidden, bases = _inputs((3, 5), 59, 1025)
    targets = torch.full((3, 5), -100)
    with tiles(tile):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, reduction=reduction, label_smoothing=0.1, impl=impl)
        loss.sum().backward()
    assert loss.dtype == torch.float32
    assert bool((loss == 0).all()), f"loss {loss}"
    for name, grad in (("hidden", hidden.grad), ("bases", bases.grad)):
        assert grad is not None and grad.shape == (hidden if name == "hidden" else bases).shape
        assert bool((grad == 0).all()), f"{name}.grad is not all zero (NaN? {bool(grad.isnan().any())})"


# --- similarity_topk ------------------------------------------------------------------------------
def _topk_params():
    params = []
    for tile, shape in ((p.values[0], p.values[1]) for p in tile_shape_params()):
        v = shape[2]
        ks = sorted({k for k in (1, 5, v) if k <= v and not (k == v and v > 2048)})
        for k in ks:
            params.append(pytest.param(tile, shape, k, id=f"{tile}-{shape[0]}-d{shape[1]}-V{v}-k{k}"))
    return params


def _check_topk_result(values, indices, hidden, bases, k, options):
    """Values sorted, indices distinct and in range, and the float64 logits gathered at the
    returned indices equal the returned values (so the indices are consistent whatever the ties)."""
    lead, v = hidden.shape[:-1], bases.shape[0]
    assert values.shape == (*lead, k) and indices.shape == (*lead, k)
    assert indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < v)).all())
    if k > 1 and values.numel():
        assert bool((values[..., :-1] >= values[..., 1:]).all()), "values are not sorted descending"
        assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all()), "an index is returned twice in a row"
    truth = ref.similarity_logits(hidden.detach().double(), bases.detach().double(), **options)
    assert_matches(values, truth.gather(-1, indices), tol=FP32_TOL, name="logits at returned indices")


@pytest.mark.parametrize("options", SIMILARITY_OPTIONS[:3])
@pytest.mark.parametrize("tile,shape,k", _topk_params())
@pytest.mark.parametrize("impl", BACKENDS)
def test_topk_matches_reference(impl, tile, shape, k, options):
    lead, d, v = shape
    hidden, bases = _inputs(lead, d, v)
    rh, rb = leaf(hidden), leaf(bases)
    with tiles(tile):
        values, indices = vf.similarity_topk(hidden, bases, k, impl=impl, **options)
        expected_values, _ = ref.similarity_topk(hidden.detach(), bases.detach(), k, **options)
        assert values.dtype == torch.float32
        assert_matches(values, expected_values, tol=FP32_TOL, name="top-k values")
        _check_topk_result(values, indices, hidden, bases, k, options)
        # Gradient of the values: the reference logits gathered at the backend's own indices, so
        # that tied candidates (d = 1 has many) cannot make the two pick different entries.
        upstream = torch.randn_like(values)
        _backward(values, upstream)
        _backward(ref.similarity_logits(rh, rb, **options).gather(-1, indices), upstream)
        l1 = upstream.abs().double()
        _check_grads(hidden, bases, rh, rb, options, l1.sum(-1), l1.sum())


# --- gradients with only one input requiring grad -------------------------------------------------
def _run_op(op, hidden, bases, *, impl=None):
    """The differentiable output of ``op``: the backend's when ``impl`` is given, else the reference's
    (top-k is only run on a backend; its reference gradient is taken at the backend's indices)."""
    kwargs = {} if impl is None else dict(impl=impl)
    mod = vf if impl is not None else ref
    if op == "logits":
        return mod.similarity_logits(hidden, bases, scale=3.0, **kwargs)
    if op == "cross_entropy":
        targets = torch.arange(hidden.shape[0]) % bases.shape[0]
        return mod.similarity_cross_entropy(hidden, bases, targets, scale=3.0, label_smoothing=0.1, reduction="sum",
                                            **kwargs)
    assert op == "topk" and impl is not None
    return vf.similarity_topk(hidden, bases, 3, scale=3.0, impl=impl)[0]


@pytest.mark.parametrize("which", ["hidden", "bases"])
@pytest.mark.parametrize("op", ["logits", "cross_entropy", "topk"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradient_of_one_input_only(impl, op, which):
    hidden = make(9, 13, requires_grad=which == "hidden")
    bases = make(129, 13, requires_grad=which == "bases")
    rh, rb = leaf(hidden), leaf(bases)
    with tile_config(max_elements=64, max_rows=4, min_columns=16):
        out = _run_op(op, hidden, bases, impl=impl)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
        if op == "topk":  # the reference logits at the backend's indices (see test_topk_matches_reference)
            _, indices = vf.similarity_topk(hidden.detach(), bases.detach(), 3, scale=3.0, impl=impl)
            expected = ref.similarity_logits(rh, rb, scale=3.0).gather(-1, indices)
        else:
            expected = _run_op(op, rh, rb)
        (expected * upstream).sum().backward()
    wanted, other = (hidden, bases) if which == "hidden" else (bases, hidden)
    assert other.grad is None, f"{'bases' if which == 'hidden' else 'hidden'} got a gradient it did not ask for"
    assert wanted.grad is not None and wanted.grad.shape == wanted.shape
    assert_matches(wanted.grad, (rh if which == "hidden" else rb).grad, tol=FP32_TOL, name=f"{which}.grad")


# --- float64 gradcheck ----------------------------------------------------------------------------
GRADCHECK_TILES = dict(max_elements=8, max_rows=2, min_columns=3)  # 4 column chunks of V = 13, 2-row blocks


def _gradcheck(fn, *inputs):
    with tile_config(**GRADCHECK_TILES):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_logits(impl, normalize):
    hidden, bases = make(3, 5, dtype=torch.float64, requires_grad=True), make(11, 5, dtype=torch.float64,
                                                                              requires_grad=True)
    _gradcheck(lambda h, b: vf.similarity_logits(h, b, scale=2.0, normalize=normalize, impl=impl), hidden, bases)


@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("mean", 0.1), ("none", 0.1), ("sum", 0.0)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_cross_entropy(impl, normalize, reduction, label_smoothing):
    hidden, bases = make(4, 7, dtype=torch.float64, requires_grad=True), make(13, 7, dtype=torch.float64,
                                                                              requires_grad=True)
    targets = torch.tensor([3, -100, 12, 0])
    out = vf.similarity_cross_entropy(hidden, bases, targets, scale=3.0, normalize=normalize, reduction=reduction,
                                      label_smoothing=label_smoothing, impl=impl)
    assert out.dtype == torch.float64
    _gradcheck(
        lambda h, b: vf.similarity_cross_entropy(h, b, targets, scale=3.0, normalize=normalize, reduction=reduction,
                                                 label_smoothing=label_smoothing, impl=impl),
        hidden, bases,
    )


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_topk_values(impl, normalize):
    hidden, bases = make(3, 6, dtype=torch.float64, requires_grad=True), make(12, 6, dtype=torch.float64,
                                                                              requires_grad=True)
    _gradcheck(lambda h, b: vf.similarity_topk(h, b, 4, scale=2.0, normalize=normalize, impl=impl)[0], hidden, bases)


# --- dtypes ---------------------------------------------------------------------------------------
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _lowp_case(op, lead, d, v, dtype, impl):
    """(backend outputs, reference outputs in ``dtype``, float64 truth): forward value then the
    gradients w.r.t. hidden and bases, all from the same low-precision inputs."""
    hidden, bases = make(*lead, d, dtype=dtype), make(v, d, dtype=dtype)
    targets = make_targets(lead, v)
    upstream = None
    results = []
    for mod, cast in ((vf, dtype), (ref, dtype), (ref, torch.float64)):
        h, b = leaf(hidden, cast), leaf(bases, cast)
        kwargs = dict(impl=impl) if mod is vf else {}
        if op == "logits":
            out = mod.similarity_logits(h, b, scale=5.0, **kwargs)
        elif op == "cross_entropy":
            out = mod.similarity_cross_entropy(h, b, targets, scale=5.0, label_smoothing=0.1, **kwargs)
        else:
            out = mod.similarity_topk(h, b, 5, scale=5.0, **kwargs)[0]
        if upstream is None:
            upstream = torch.randn(out.shape, dtype=torch.float64)
        (out.double() * upstream).sum().backward()
        results.append((out, h.grad, b.grad))
    return results


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["logits", "cross_entropy", "topk"])
@pytest.mark.parametrize("tile,shape", tile_shape_params(["N37-d130-V1025", "B3x5-d130-V7"], ("default", "tiny")))
@pytest.mark.parametrize("impl", BACKENDS)
def test_low_precision_error_bound(impl, tile, shape, op, dtype):
    lead, d, v = shape
    with tiles(tile):
        (out, dh, db), (ref_out, ref_dh, ref_db), (truth, truth_dh, truth_db) = _lowp_case(op, lead, d, v, dtype, impl)
    # Contract: logits in the input dtype; losses and top-k values float32; gradients in the input dtype.
    assert out.dtype == (dtype if op == "logits" else torch.float32)
    assert dh.dtype == dtype and db.dtype == dtype
    if op == "topk":
        # Ties may pick different entries, whose gradients go to different rows of bases; the values
        # themselves are compared against the float64 top-k, which near-ties cannot change much.
        assert_error_bound(out, ref_out, truth, name=f"{op} values")
        return
    assert_error_bound(out, ref_out, truth, name=f"{op} value")
    assert_error_bound(dh, ref_dh, truth_dh, name=f"{op} hidden.grad")
    assert_error_bound(db, ref_db, truth_db, name=f"{op} bases.grad")


@pytest.mark.parametrize("impl", BACKENDS)
def test_float64_stays_float64(impl):
    hidden, bases = make(4, 9, dtype=torch.float64), make(17, 9, dtype=torch.float64)
    targets = make_targets((4,), 17)
    assert vf.similarity_logits(hidden, bases, impl=impl).dtype == torch.float64
    assert vf.similarity_cross_entropy(hidden, bases, targets, impl=impl).dtype == torch.float64
    assert vf.similarity_topk(hidden, bases, 3, impl=impl)[0].dtype == torch.float64


# --- NaN / Inf / zero vectors ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_or_inf_stays_in_its_row(impl, tile, normalize, bad):
    """A NaN (or, normalised, an Inf: inf/inf) in one row of hidden makes that row's loss NaN; the
    other rows are finite, equal the reference, and their hidden gradients are finite. An Inf
    without normalisation gives an infinite logit, and a NaN loss row (inf - inf) too."""
    n, d, v, bad_row = 37, 59, 1025, 11
    hidden = make(n, d)
    hidden[bad_row, 7] = bad
    hidden.requires_grad_(True)
    bases = make(v, d)
    targets = torch.randint(0, v, (n,))
    good = torch.arange(n) != bad_row
    with tiles(tile):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, normalize=normalize, reduction="none", impl=impl)
        loss.sum().backward()
        logits = vf.similarity_logits(hidden.detach(), bases, normalize=normalize, impl=impl)
        values, _ = vf.similarity_topk(hidden.detach(), bases, 3, normalize=normalize, impl=impl)
    assert bool(loss[bad_row].isnan()), f"row {bad_row} should be NaN, got {loss[bad_row].item()}"
    assert bool(loss[good].isfinite().all())
    expected = ref.similarity_cross_entropy(hidden.detach()[good], bases, targets[good], normalize=normalize,
                                            reduction="none")
    assert_matches(loss[good], expected, tol=FP32_TOL, name="loss of the finite rows")
    assert bool(hidden.grad[good].isfinite().all()), "a finite row got a non-finite gradient"
    assert bool(logits[good].isfinite().all()) and bool(values[good].isfinite().all())
    assert not bool(logits[bad_row].isfinite().all()) and not bool(values[bad_row].isfinite().all())


@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_vectors_are_valid(impl, tile):
    """All-zero rows (and rows of norm below eps) in hidden and bases are normalised with eps: finite
    values and gradients that match the reference (whose F.normalize clamps the norm at eps)."""
    lead, d, v = (37,), 59, 1025
    hidden, bases = make(*lead, d), make(v, d)
    hidden[[0, 20, 36]] = 0.0
    bases[[0, 500, 1024]] = 0.0
    # Rows with 0 < |x| < eps: scaled by 1/eps like zero rows, and their norm carries no gradient.
    hidden[5] = torch.nn.functional.normalize(hidden[5], dim=0) * 0.9e-8
    bases[7] = torch.nn.functional.normalize(bases[7], dim=0) * 0.9e-8
    hidden.requires_grad_(True)
    bases.requires_grad_(True)
    rh, rb = leaf(hidden), leaf(bases)
    targets = torch.randint(0, v, lead)
    targets[0] = 500  # a zero hidden row whose target is a zero basis
    with tiles(tile):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, scale=4.0, label_smoothing=0.1, impl=impl)
        loss.backward()
        expected = ref.similarity_cross_entropy(rh, rb, targets, scale=4.0, label_smoothing=0.1)
        expected.backward()
        values, indices = vf.similarity_topk(hidden.detach(), bases.detach(), 5, impl=impl)
        logits = vf.similarity_logits(hidden.detach(), bases.detach(), impl=impl)
    for name, x in (("loss", loss), ("hidden.grad", hidden.grad), ("bases.grad", bases.grad), ("logits", logits)):
        assert bool(x.isfinite().all()), f"{name} is not finite"
    assert bool((logits[0] == 0).all()) and bool((logits[:, 500] == 0).all())
    assert_matches(loss, expected, tol=FP32_TOL, name="loss")
    # The eps clamp makes a zero row's gradient 1/eps times its upstream: compare the zero rows and
    # the others separately, each relative to its own magnitude.
    for name, grad, expected_grad, zero in (("hidden.grad", hidden.grad, rh.grad, [0, 5, 20, 36]),
                                            ("bases.grad", bases.grad, rb.grad, [0, 7, 500, 1024])):
        mask = torch.zeros(grad.shape[0], dtype=torch.bool)
        mask[zero] = True
        assert_matches(grad[mask], expected_grad[mask], tol=FP32_TOL, name=f"{name} of zero rows")
        assert_matches(grad[~mask], expected_grad[~mask], tol=FP32_TOL, name=f"{name} of the other rows")
    assert_matches(logits, ref.similarity_logits(hidden.detach(), bases.detach()), tol=FP32_TOL, name="logits")
    _check_topk_result(values, indices, hidden, bases, 5, {})


# --- empty batches and auto -----------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(0,), (4, 0)], ids=["N0", "B4xN0"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_batch(impl, lead):
    d, v = 59, 1025
    hidden, bases = make(*lead, d, requires_grad=True), make(v, d, requires_grad=True)
    targets = torch.zeros(lead, dtype=torch.long)
    assert vf.similarity_logits(hidden, bases, impl=impl).shape == (*lead, v)
    values, indices = vf.similarity_topk(hidden, bases, 5, impl=impl)
    assert values.shape == indices.shape == (*lead, 5)
    assert vf.similarity_cross_entropy(hidden, bases, targets, reduction="none", impl=impl).shape == lead
    for reduction in ("mean", "sum"):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, reduction=reduction, label_smoothing=0.1, impl=impl)
        assert loss.shape == () and loss.item() == 0.0
    (loss + values.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert bases.grad.shape == bases.shape and bool((bases.grad == 0).all())


def test_auto_matches_reference():
    hidden, bases = make(3, 5, 59), make(1025, 59)
    targets = make_targets((3, 5), 1025)
    assert_matches(vf.similarity_logits(hidden, bases), ref.similarity_logits(hidden, bases), tol=FP32_TOL)
    assert_matches(vf.similarity_cross_entropy(hidden, bases, targets),
                   ref.similarity_cross_entropy(hidden, bases, targets), tol=FP32_TOL)
    assert "torch" in BACKENDS and set(BACKENDS) <= {"cuda", "triton", "cpu", "torch"}


@pytest.mark.parametrize("impl", BACKENDS)
def test_float64_label_smoothing_is_float64_accurate(impl):
    """The one-hot part of the gradient is built in the accumulation dtype: float64 inputs with
    label smoothing get float64-accurate gradients (a float32 constant gave errors near 1e-9)."""
    hidden, bases = make(13, 17, dtype=torch.float64, requires_grad=True), make(29, 17, dtype=torch.float64,
                                                                                requires_grad=True)
    rh, rb = leaf(hidden), leaf(bases)
    targets = make_targets((13,), 29)
    vf.similarity_cross_entropy(hidden, bases, targets, scale=9.0, label_smoothing=0.1, reduction="sum",
                                impl=impl).backward()
    ref.similarity_cross_entropy(rh, rb, targets, scale=9.0, label_smoothing=0.1, reduction="sum").backward()
    assert (hidden.grad - rh.grad).abs().max() < 1e-12
    assert (bases.grad - rb.grad).abs().max() < 1e-12
