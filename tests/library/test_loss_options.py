"""``similarity_cross_entropy``'s class weights (``weight=``) and z-loss (``z_loss=``), and the
module form ``SimilarityCrossEntropyLoss``: values and gradients against the reference and
against ``F.cross_entropy`` itself, on every backend, in every dtype, with ignored rows, label
smoothing and every reduction; under autocast and torch.compile; bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends.tiles import tile_config

from helpers import BACKENDS, assert_error_bound, assert_matches, leaf, make, make_targets, tiles

TOL = 2e-5
OPTIONS = {
    "weight": dict(weight=True),
    "z": dict(z_loss=1e-3),
    "weight+z": dict(weight=True, z_loss=0.05),
}


def _options(name: str, vocab: int, dtype=torch.float32) -> dict:
    options = dict(OPTIONS[name])
    if options.pop("weight", False):
        options["weight"] = (torch.rand(vocab, dtype=torch.float64) * 2).to(dtype)
    return options


def _both(hidden, bases, targets, upstream=None, **kwargs):
    """(loss, hidden.grad, bases.grad) of the backend and of the reference, for ``loss * upstream``."""
    impl = kwargs.pop("impl")
    rh, rb = leaf(hidden), leaf(bases)
    loss = vf.similarity_cross_entropy(hidden, bases, targets, impl=impl, **kwargs)
    expected = ref.similarity_cross_entropy(rh, rb, targets, **kwargs)
    upstream = torch.rand(loss.shape, dtype=loss.dtype) + 0.5 if upstream is None else upstream
    (loss * upstream).sum().backward()
    (expected * upstream.to(expected.dtype)).sum().backward()
    return (loss, hidden.grad, bases.grad), (expected, rh.grad, rb.grad)


def _assert_all_match(actual, expected, tol):
    names = ("loss", "hidden grad", "bases grad")
    magnitude = max([1.0] + [float(e.abs().max()) for e in expected[1:] if e.numel()])
    for name, a, e in zip(names, actual, expected):
        assert_matches(a, e, tol=tol * (1 if name == "loss" else 10 * magnitude), name=name)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("mean", 0.1), ("sum", 0.0), ("none", 0.2)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_options_match_reference(impl, tile, normalize, reduction, label_smoothing, option):
    lead, d, v = (3, 7), 59, 1025
    hidden, bases = make(*lead, d, requires_grad=True), make(v, d, requires_grad=True)
    targets = make_targets(lead, v, ignored=0.3)
    kwargs = dict(scale=20.0 if normalize else 0.5, normalize=normalize, reduction=reduction,
                  label_smoothing=label_smoothing, impl=impl, **_options(option, v))
    with tiles(tile):
        actual, expected = _both(hidden, bases, targets, **kwargs)
    _assert_all_match(actual, expected, TOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_class_weights_follow_torch_cross_entropy(impl, reduction, label_smoothing):
    """Against F.cross_entropy itself (not our reference): weighted smoothing sums and "mean"
    dividing by the summed target weights are torch's."""
    hidden, bases = make(41, 17, dtype=torch.float64, requires_grad=True), make(97, 17, dtype=torch.float64,
                                                                                requires_grad=True)
    targets = make_targets((41,), 97, ignored=0.2)
    weight = torch.rand(97, dtype=torch.float64)
    loss = vf.similarity_cross_entropy(hidden, bases, targets, scale=6.0, weight=weight, reduction=reduction,
                                       label_smoothing=label_smoothing, impl=impl)
    rh, rb = leaf(hidden), leaf(bases)
    logits = 6.0 * F.normalize(rh, dim=-1) @ F.normalize(rb, dim=-1).T
    expected = F.cross_entropy(logits, targets, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    upstream = torch.rand(loss.shape, dtype=torch.float64)
    (loss * upstream).sum().backward()
    (expected * upstream).sum().backward()
    _assert_all_match((loss, hidden.grad, bases.grad), (expected, rh.grad, rb.grad), 1e-10)


@pytest.mark.parametrize("impl", BACKENDS)
def test_z_loss_is_the_squared_log_sum_exp(impl):
    """z_loss adds w[t] * z * lse**2 per non-ignored row: equal to adding it by hand from return_lse."""
    hidden, bases = make(29, 13, requires_grad=True), make(211, 13, requires_grad=True)
    targets = make_targets((29,), 211, ignored=0.3)
    weight = torch.rand(211) + 0.5
    z = 0.02
    fused = vf.similarity_cross_entropy(hidden, bases, targets, scale=9.0, weight=weight, z_loss=z, impl=impl)
    rh, rb = leaf(hidden), leaf(bases)
    loss, lse = vf.similarity_cross_entropy(rh, rb, targets, scale=9.0, weight=weight, impl=impl, return_lse=True)
    valid = targets != -100
    w = torch.where(valid, weight[targets.clamp_min(0)], 0.0)
    by_hand = loss + (w * z * lse.square()).sum() / w.sum()
    fused.backward()
    by_hand.backward()
    _assert_all_match((fused, hidden.grad, bases.grad), (by_hand, rh.grad, rb.grad), TOL)


@pytest.mark.parametrize("mix", ["loss", "lse", "both"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_lse_gradient_with_options(impl, mix):
    """return_lse together with weight and z_loss: the log-sum-exp's gradient adds to theirs."""
    hidden, bases = make(4, 5, 23, requires_grad=True), make(301, 23, requires_grad=True)
    targets = make_targets((4, 5), 301, ignored=0.3)
    kwargs = dict(scale=12.0, label_smoothing=0.1, weight=torch.rand(301) + 0.1, z_loss=0.01)
    rh, rb = leaf(hidden), leaf(bases)
    loss, lse = vf.similarity_cross_entropy(hidden, bases, targets, impl=impl, return_lse=True, **kwargs)
    expected = ref.similarity_cross_entropy(rh, rb, targets, **kwargs)
    expected_lse = torch.logsumexp(ref.similarity_logits(rh, rb, scale=12.0).float(), dim=-1)
    upstream = torch.rand(lse.shape)
    pick = {"loss": (1.0, 0.0), "lse": (0.0, 1.0), "both": (0.5, 1.0)}[mix]
    (pick[0] * loss + pick[1] * (lse * upstream).sum()).backward()
    (pick[0] * expected + pick[1] * (expected_lse * upstream).sum()).backward()
    assert_matches(lse, expected_lse, tol=TOL, name="lse")
    _assert_all_match((loss, hidden.grad, bases.grad), (expected, rh.grad, rb.grad), TOL)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_options_in_every_dtype(impl, dtype, option):
    """Low precision: the backend's error against float64 is bounded by the reference's own
    error in that dtype (as for the plain loss); float64 matches to float64 accuracy."""
    hidden64, bases64 = make(37, 59, dtype=torch.float64), make(1025, 59, dtype=torch.float64)
    targets = make_targets((37,), 1025, ignored=0.25)
    options = _options(option, 1025, torch.float64)
    kwargs = dict(scale=15.0, label_smoothing=0.05, **options)
    truth = _both(leaf(hidden64), leaf(bases64), targets, upstream=torch.ones((), dtype=torch.float64),
                  impl="torch", **kwargs)[1]
    low = dict(kwargs, weight=options["weight"].to(dtype)) if "weight" in options else kwargs
    actual, expected = _both(leaf(hidden64, dtype), leaf(bases64, dtype), targets, upstream=torch.ones(()),
                             impl=impl, **low)
    if dtype == torch.float64:
        _assert_all_match(actual, truth, 1e-10)
        return
    for name, out, reference, exact in zip(("loss", "hidden grad", "bases grad"), actual, expected, truth):
        assert out.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_error_bound(out.float(), reference.float(), exact, name=name, factor=2.0, slack=5e-3)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_with_options(impl, label_smoothing):
    hidden = make(5, 6, dtype=torch.float64, requires_grad=True)
    bases = make(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 12, 0, 3])
    weight = torch.rand(13, dtype=torch.float64) + 0.1

    def fn(h, b):
        return vf.similarity_cross_entropy(h, b, targets, scale=3.0, weight=weight, z_loss=0.1,
                                           label_smoothing=label_smoothing, impl=impl)

    with tile_config(max_elements=8, max_rows=2, min_columns=3):
        assert torch.autograd.gradcheck(fn, (hidden, bases), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_total_weight_gives_zero_loss_and_gradients(impl):
    """"mean" over targets whose weights are all zero (or all ignored) is 0.0, as the plain loss's
    all-ignored case, not torch's NaN."""
    hidden, bases = make(6, 9, requires_grad=True), make(20, 9, requires_grad=True)
    targets = torch.tensor([1, 1, -100, 2, 2, -100])
    weight = torch.ones(20)
    weight[1] = weight[2] = 0.0
    loss = vf.similarity_cross_entropy(hidden, bases, targets, weight=weight, z_loss=0.1, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not bases.grad.any()


@pytest.mark.parametrize("impl", BACKENDS)
def test_unit_weights_and_zero_z_loss_change_nothing(impl):
    hidden, bases = make(31, 19), make(257, 19)
    targets = make_targets((31,), 257)
    plain = vf.similarity_cross_entropy(hidden, bases, targets, scale=7.0, impl=impl)
    weighted = vf.similarity_cross_entropy(hidden, bases, targets, scale=7.0, weight=torch.ones(257), impl=impl)
    assert_matches(weighted, plain, tol=1e-6, name="unit weights")
    assert torch.equal(vf.similarity_cross_entropy(hidden, bases, targets, scale=7.0, z_loss=0.0, impl=impl), plain)


def test_options_under_autocast_equal_explicit_bf16():
    hidden, bases = make(23, 31), make(301, 31)
    targets = make_targets((23,), 301)
    kwargs = dict(scale=10.0, weight=torch.rand(301), z_loss=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = vf.similarity_cross_entropy(hidden, bases, targets, **kwargs)
    explicit = vf.similarity_cross_entropy(hidden.bfloat16(), bases.bfloat16(), targets, **kwargs)
    assert under.dtype == torch.float32
    assert torch.equal(under, explicit)


@pytest.mark.parametrize("impl", ["auto", *BACKENDS])
def test_compile_with_options(impl):
    def loss_fn(hidden, bases, targets, weight):
        return vf.similarity_cross_entropy(hidden, bases, targets, scale=8.0, weight=weight, z_loss=1e-2,
                                           label_smoothing=0.1, impl=impl)

    hidden, bases = make(3, 5, 11, requires_grad=True), make(37, 11, requires_grad=True)
    targets, weight = make_targets((3, 5), 37), torch.rand(37)
    torch._dynamo.reset()
    out = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, bases, targets, weight)
    out.backward()
    rh, rb = leaf(hidden), leaf(bases)
    expected = ref.similarity_cross_entropy(rh, rb, targets, scale=8.0, weight=weight, z_loss=1e-2,
                                            label_smoothing=0.1)
    expected.backward()
    _assert_all_match((out, hidden.grad, bases.grad), (expected, rh.grad, rb.grad), TOL)
    torch._dynamo.reset()


# --- the module form ------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", BACKENDS)
def test_module_equals_the_function(impl):
    weight = torch.rand(101)
    loss_fn = vf.SimilarityCrossEntropyLoss(scale=11.0, reduction="sum", label_smoothing=0.1, weight=weight,
                                            z_loss=1e-3, impl=impl)
    hidden, bases = make(2, 9, 13, requires_grad=True), make(101, 13, requires_grad=True)
    targets = make_targets((2, 9), 101)
    rh, rb = leaf(hidden), leaf(bases)
    loss = loss_fn(hidden, bases, targets)
    expected = vf.similarity_cross_entropy(rh, rb, targets, scale=11.0, reduction="sum", label_smoothing=0.1,
                                           weight=weight, z_loss=1e-3, impl=impl)
    loss.backward()
    expected.backward()
    assert torch.equal(loss, expected)
    assert torch.equal(hidden.grad, rh.grad) and torch.equal(bases.grad, rb.grad)


def test_module_weight_is_a_buffer():
    loss_fn = vf.SimilarityCrossEntropyLoss(weight=torch.rand(7, dtype=torch.float64))
    assert "weight" in loss_fn.state_dict()
    assert loss_fn.to(torch.float32).weight.dtype == torch.float32
    assert "SimilarityCrossEntropyLoss(scale=1.0" in repr(loss_fn)
    assert vf.SimilarityCrossEntropyLoss().weight is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(scale="2"), "scale"), (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"), (dict(weight=torch.ones(3, 2)), "weight"), (dict(weight=[1.0]), "weight"),
    (dict(impl="gpu"), "impl"), (dict(ignore_index=1.5), "ignore_index"), (dict(eps=0.0), "eps"),
])
def test_module_checks_options_when_built(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        vf.SimilarityCrossEntropyLoss(**kwargs)


# --- bad options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("weight,error", [
    (torch.ones(5, 1), ValueError), (torch.ones(4), ValueError), (torch.ones(5, dtype=torch.long), TypeError),
    ([1.0] * 5, TypeError),
])
def test_bad_weight_is_named(weight, error):
    with pytest.raises(error, match="weight"):
        vf.similarity_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), weight=weight)


@pytest.mark.parametrize("z_loss,error", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                          (True, TypeError), ("0.1", TypeError)])
def test_bad_z_loss_is_named(z_loss, error):
    with pytest.raises(error, match="z_loss"):
        vf.similarity_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), z_loss=z_loss)


@pytest.mark.parametrize("name,value", [("scale", float("inf")), ("scale", -float("inf")), ("scale", 10 ** 400),
                                        ("eps", float("inf")), ("label_smoothing", float("inf"))])
def test_non_finite_numbers_are_refused(name, value):
    """scale=inf gave NaN outputs and eps=inf a uniform loss, silently; 10**400 an OverflowError."""
    with pytest.raises(ValueError, match=f"{name} must"):
        vf.similarity_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), **{name: value})
