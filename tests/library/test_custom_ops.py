"""The torch.library registration: ``torch.library.opcheck`` on every custom op (schema, fake
implementation, autograd registration, AOT dispatch), and ``torch.compile(fullgraph=True)`` through
the public Python wrappers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vocabsem_fast as vf
from vocabsem_fast import reference as ref

from helpers import BACKENDS, assert_matches, leaf, make, make_targets

OPS = torch.ops.vocabsem_fast
N, D, V, K = 6, 11, 37, 4
ALL_OPS = {
    "similarity_logits", "similarity_logits_backward",
    "similarity_cross_entropy", "similarity_cross_entropy_backward",
    "similarity_topk", "similarity_topk_backward",
    "soft_assign", "soft_assign_backward",
    "batched_argmax",
}


class OpCalls(TorchDispatchMode):
    """Records each vocabsem_fast op call (overload, args, kwargs) made by the public functions, so
    the opchecks below use exactly the arguments the wrappers and autograd formulas pass, whatever
    the ops' private schemas are."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vocabsem_fast":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)

    @property
    def names(self) -> set[str]:
        return {_short(func) for func, _, _ in self.calls}


def _short(func) -> str:
    return func.name().split("::")[-1]


def _capture(fn) -> OpCalls:
    rec = OpCalls()
    with rec:
        fn()
    return rec


def _fresh(arg, keep_grad: bool):
    if not isinstance(arg, torch.Tensor):
        return arg
    return arg.detach().clone().requires_grad_(keep_grad and arg.requires_grad)


def _opcheck_all(rec: OpCalls) -> None:
    # test_aot_dispatch_dynamic traces each op with dynamic shapes through AOTAutograd: the fake
    # implementation and the registered autograd formula must agree with the real kernel. The
    # backward ops have no autograd of their own, so their inputs are passed detached.
    assert rec.calls, "no vocabsem_fast op was called"
    for func, args, kwargs in rec.calls:
        differentiable = not _short(func).endswith("_backward")
        args = tuple(_fresh(a, differentiable) for a in args)
        kwargs = {key: _fresh(a, differentiable) for key, a in kwargs.items()}
        result = torch.library.opcheck(func, args, kwargs)
        failed = {name: outcome for name, outcome in result.items() if outcome != "SUCCESS"}
        assert not failed, f"{func}: {failed}"


def _pair(dtype=torch.float32, requires_grad=(True, True)):
    return make(N, D, dtype=dtype, requires_grad=requires_grad[0]), make(V, D, dtype=dtype,
                                                                         requires_grad=requires_grad[1])


def _backward(out):
    if out.requires_grad:
        (out.float() * torch.randn(out.shape)).sum().backward()


GRAD_CASES = {"both": (True, True), "hidden": (True, False), "bases": (False, True), "none": (False, False)}


def _check(fn):
    rec = _capture(fn)
    _opcheck_all(rec)
    return rec


# --- opcheck --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad", GRAD_CASES.keys())
@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_similarity_logits(impl, grad, dtype, normalize):
    hidden, bases = _pair(dtype, GRAD_CASES[grad])
    rec = _check(lambda: _backward(vf.similarity_logits(hidden, bases, scale=2.0, normalize=normalize,
                                                             impl=impl)))
    assert "similarity_logits" in rec.names
    assert ("similarity_logits_backward" in rec.names) == (grad != "none")


@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad", GRAD_CASES.keys())
@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_similarity_cross_entropy(impl, grad, dtype, reduction, label_smoothing):
    hidden, bases = _pair(dtype, GRAD_CASES[grad])
    targets = make_targets((N,), V)
    rec = _check(lambda: _backward(vf.similarity_cross_entropy(
        hidden, bases, targets, scale=3.0, reduction=reduction, label_smoothing=label_smoothing, impl=impl)))
    assert "similarity_cross_entropy" in rec.names


@pytest.mark.parametrize("options", [dict(weight=True), dict(z_loss=1e-2), dict(weight=True, label_smoothing=0.1)],
                         ids=["weight", "z", "weight-smooth"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("grad", ["both", "bases"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_cross_entropy_options(impl, grad, reduction, options):
    hidden, bases = _pair(requires_grad=GRAD_CASES[grad])
    targets = make_targets((N,), V)
    options = dict(options, weight=torch.rand(V)) if options.get("weight") else options
    rec = _check(lambda: _backward(vf.similarity_cross_entropy(hidden, bases, targets, scale=3.0, reduction=reduction,
                                                               impl=impl, **options)))
    assert {"similarity_cross_entropy", "similarity_cross_entropy_backward"} <= rec.names or (
        reduction == "mean" and "z_loss" not in options and "label_smoothing" not in options)


@pytest.mark.parametrize("grad", GRAD_CASES.keys())
@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_similarity_topk(impl, grad):
    hidden, bases = _pair(requires_grad=GRAD_CASES[grad])
    rec = _check(lambda: _backward(vf.similarity_topk(hidden, bases, 5, scale=2.0, impl=impl)[0]))
    assert ("similarity_topk_backward" in rec.names) == (grad != "none")


@pytest.mark.parametrize("grad", GRAD_CASES.keys())
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_assign(impl, batched, grad):
    lead = (2,) if batched else ()
    need_p, need_c = GRAD_CASES[grad]
    points, centroids = make(*lead, N, D, requires_grad=need_p), make(*lead, K, D, requires_grad=need_c)
    rec = _check(lambda: _backward(vf.assign(points, centroids, temperature=0.5, impl=impl)))
    assert ("soft_assign_backward" in rec.names) == (grad != "none")
    rec = _check(lambda: _backward(vf.assign(points, centroids, hard=True, impl=impl)[1]))
    assert ("batched_argmax" in rec.names) == batched


@pytest.mark.parametrize("which", ["hidden", "bases"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_backward_ops_skip_unneeded_gradients(impl, which):
    """With one input requiring grad, each backward op returns an empty tensor for the other:
    ctx.needs_input_grad is honoured and the unneeded gradient is never computed."""
    hidden, bases = _pair(requires_grad=(which == "hidden", which == "bases"))
    targets = make_targets((N,), V)
    rec = _capture(lambda: [
        _backward(vf.similarity_logits(hidden, bases, impl=impl)),
        _backward(vf.similarity_cross_entropy(hidden, bases, targets, reduction="none", impl=impl)),
        _backward(vf.similarity_topk(hidden, bases, 3, impl=impl)[0]),
    ])
    backward_calls = [call for call in rec.calls if _short(call[0]).endswith("_backward")]
    assert len(backward_calls) == 3, [call[0] for call in rec.calls]
    for func, args, kwargs in backward_calls:
        dh, db = func(*args, **kwargs)
        wanted, skipped = (dh, db) if which == "hidden" else (db, dh)
        assert wanted.shape == (hidden if which == "hidden" else bases).shape, func
        assert skipped.numel() == 0, f"{func} computed a gradient nobody asked for"


@pytest.mark.parametrize("impl", BACKENDS)
def test_opcheck_cases_cover_every_op(impl):
    """The calls made by the opcheck tests above reach every registered op, forward and backward
    (here: each with both inputs requiring grad, cross-entropy with reduction="none")."""
    hidden, bases = _pair()
    points, centroids = make(2, N, D, requires_grad=True), make(2, K, D, requires_grad=True)
    rec = _capture(lambda: [
        _backward(vf.similarity_logits(hidden, bases, impl=impl)),
        _backward(vf.similarity_cross_entropy(hidden, bases, make_targets((N,), V), reduction="none", impl=impl)),
        _backward(vf.similarity_topk(hidden, bases, 3, impl=impl)[0]),
        _backward(vf.assign(points, centroids, impl=impl)),
        _backward(vf.assign(points, centroids, hard=True, impl=impl)[1]),
    ])
    for name in ALL_OPS:
        assert hasattr(OPS, name), f"torch.ops.vocabsem_fast.{name} is not registered"
    assert rec.names == ALL_OPS, f"not reached: {sorted(ALL_OPS - rec.names)}; unknown: {sorted(rec.names - ALL_OPS)}"


# --- torch.compile(fullgraph=True) ----------------------------------------------------------------
@pytest.fixture
def compile_clean():
    """A fresh dynamo state, and no warning from it (e.g. about tracing through a functools cache,
    which dynamo bypasses with a warning of possible silent incorrectness)."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    torch._dynamo.reset()
    dynamo = [str(w.message) for w in caught if "dynamo" in str(w.filename).lower() or "Dynamo" in str(w.message)]
    assert not dynamo, dynamo


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("impl", ["auto", *BACKENDS])
def test_compile_cross_entropy(impl, backend, compile_clean):
    def loss_fn(hidden, bases, targets):
        loss = vf.similarity_cross_entropy(hidden, bases, targets, scale=8.0, label_smoothing=0.1, impl=impl)
        return 2.0 * loss + 1.0  # ops around the call end up in the same graph

    hidden, bases = make(3, 5, D, requires_grad=True), make(V, D, requires_grad=True)
    targets = make_targets((3, 5), V)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)

    out = compiled(hidden, bases, targets)
    out.backward()
    eh, eb = leaf(hidden), leaf(bases)
    eager = loss_fn(eh, eb, targets)
    eager.backward()
    rh, rb = leaf(hidden), leaf(bases)
    expected = 2.0 * ref.similarity_cross_entropy(rh, rb, targets, scale=8.0, label_smoothing=0.1) + 1.0
    expected.backward()

    assert out.dtype == torch.float32 and out.shape == ()
    assert_matches(out, eager, tol=1e-6, name="compiled vs eager loss")
    assert_matches(out, expected, tol=2e-5, name="compiled vs reference loss")
    for name, grad, eager_grad, ref_grad in (("hidden", hidden.grad, eh.grad, rh.grad),
                                             ("bases", bases.grad, eb.grad, rb.grad)):
        assert_matches(grad, eager_grad, tol=1e-6, name=f"compiled vs eager {name}.grad")
        assert_matches(grad, ref_grad, tol=2e-5, name=f"compiled vs reference {name}.grad")

    # New batches, of the same shape and of another (a recompile with dynamic shapes, through the
    # fake implementations), give the new answers.
    for lead in ((3, 5), (7, 2)):
        hidden2, targets2 = make(*lead, D), make_targets(lead, V)
        assert_matches(compiled(hidden2, bases.detach(), targets2),
                       2.0 * ref.similarity_cross_entropy(hidden2, bases.detach(), targets2, scale=8.0,
                                                          label_smoothing=0.1) + 1.0, tol=2e-5, name=f"batch {lead}")

@pytest.mark.parametrize("impl", ["auto", *BACKENDS])
def test_compile_cross_entropy_with_lse(impl, compile_clean):
    """The log-sum-exp output and its gradient under torch.compile(fullgraph=True): one graph."""
    def loss_fn(hidden, bases, targets):
        loss, lse = vf.similarity_cross_entropy(hidden, bases, targets, scale=8.0, impl=impl, return_lse=True)
        return loss + 1e-2 * lse.square().mean()  # a z-loss

    hidden, bases = make(3, 5, D, requires_grad=True), make(V, D, requires_grad=True)
    targets = make_targets((3, 5), V)
    out = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(hidden, bases, targets)
    out.backward()
    eh, eb = leaf(hidden), leaf(bases)
    eager = loss_fn(eh, eb, targets)
    eager.backward()
    assert_matches(out, eager, tol=1e-6, name="compiled vs eager")
    assert_matches(hidden.grad, eh.grad, tol=1e-6, name="compiled vs eager hidden.grad")
    assert_matches(bases.grad, eb.grad, tol=1e-6, name="compiled vs eager bases.grad")



@pytest.mark.parametrize("impl", ["auto", *BACKENDS])
def test_compile_topk(impl, compile_clean):
    def topk_fn(hidden, bases):
        values, indices = vf.similarity_topk(hidden, bases, 4, scale=3.0, impl=impl)
        return values.sum(-1), indices

    hidden, bases = make(N, D, requires_grad=True), make(V, D, requires_grad=True)
    compiled = torch.compile(topk_fn, fullgraph=True, backend="aot_eager")
    summed, indices = compiled(hidden, bases)
    upstream = torch.randn(N)
    (summed * upstream).sum().backward()

    expected_values, _ = ref.similarity_topk(hidden.detach(), bases.detach(), 4, scale=3.0)
    assert_matches(summed, expected_values.sum(-1), tol=2e-5, name="compiled top-k values")
    rh, rb = leaf(hidden), leaf(bases)
    picked = ref.similarity_logits(rh, rb, scale=3.0).gather(-1, indices)
    assert_matches(picked.sum(-1), summed, tol=2e-5, name="reference logits at compiled indices")
    (picked.sum(-1) * upstream).sum().backward()
    assert_matches(hidden.grad, rh.grad, tol=2e-5, name="hidden.grad")
    assert_matches(bases.grad, rb.grad, tol=2e-5, name="bases.grad")


@pytest.mark.parametrize("impl", BACKENDS)
def test_compile_assign(impl, compile_clean):
    def fn(points, centroids):
        probs = vf.assign(points, centroids, temperature=0.5, impl=impl)
        indices, scores = vf.assign(points, centroids, hard=True, impl=impl)
        return probs, indices, scores

    points, centroids = make(N, D, requires_grad=True), make(K, D, requires_grad=True)
    probs, indices, scores = torch.compile(fn, fullgraph=True, backend="aot_eager")(points, centroids)
    rp, rc = leaf(points), leaf(centroids)
    expected = ref.assign(rp, rc, temperature=0.5)
    assert_matches(probs, expected, tol=2e-5, name="soft assignments")
    _, expected_scores = ref.assign(points.detach(), centroids.detach(), hard=True)
    assert_matches(scores, expected_scores, tol=2e-5, name="hard scores")
    cos = torch.nn.functional.cosine_similarity(points.detach().double()[:, None], centroids.detach().double()[None],
                                                dim=-1)
    assert_matches(scores, cos.gather(-1, indices[:, None])[:, 0], tol=2e-5, name="score at the returned index")
    upstream = torch.randn_like(expected)
    (probs * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert_matches(points.grad, rp.grad, tol=2e-5, name="points.grad")
    assert_matches(centroids.grad, rc.grad, tol=2e-5, name="centroids.grad")
