"""Numerical edge cases of the ops that a training loop meets: loss scaling in float16, zero
upstream gradients, inputs whose gradients overflow the input dtype."""

from __future__ import annotations

import nan_and_overflow_cases
import pytest
import torch

import vocabsem_fast as vf
from vocabsem_fast import reference as ref

from helpers import BACKENDS, assert_close, leaf, make, make_targets

GRAD_SCALER_SCALE = 65536.0  # torch.amp.GradScaler's default initial scale: not a float16 value


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_float16_loss_scaling_gives_the_scaled_gradient(impl, reduction):
    n, d, v = 67, 19, 131
    hidden, bases = make(n, d, dtype=torch.float16, requires_grad=True), make(v, d, dtype=torch.float16,
                                                                                requires_grad=True)
    targets = make_targets((n,), v)
    scale = GRAD_SCALER_SCALE if reduction == "mean" else GRAD_SCALER_SCALE / n  # keep the truth in fp16 range
    (vf.similarity_cross_entropy(hidden, bases, targets, scale=5.0, reduction=reduction, impl=impl) * scale).backward()
    rh, rb = leaf(hidden, torch.float64), leaf(bases, torch.float64)
    (ref.similarity_cross_entropy(rh, rb, targets, scale=5.0, reduction=reduction) * scale).backward()
    for name, got, truth in (("hidden.grad", hidden.grad, rh.grad), ("bases.grad", bases.grad, rb.grad)):
        assert truth.abs().max() < 30000, "the test's truth must fit float16"
        assert bool(torch.isfinite(got).all()), f"{name}: non-finite entries under loss scaling"
        magnitude = truth.abs().max().item()
        assert_close(got, truth, rtol=2e-2, atol=2e-2 * magnitude, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_upstream_gives_zero_gradients_even_where_they_overflow(impl, dtype):
    """All-zero bases: the normalisation's gradient there is 1/eps times the upstream, beyond
    float16; with a zero upstream the gradient is exactly zero."""
    hidden = make(9, 7, dtype=dtype, requires_grad=True)
    bases = torch.zeros(13, 7, dtype=dtype, requires_grad=True)
    targets = make_targets((9,), 13, ignored=0.0)
    (vf.similarity_cross_entropy(hidden, bases, targets, scale=5.0, impl=impl) * 0.0).backward()
    assert torch.equal(bases.grad, torch.zeros_like(bases)), "bases.grad must be zero, got " + str(bases.grad)
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("op", ["cross_entropy", "logits", "topk"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_autocast_runs_the_pair_in_the_autocast_dtype(impl, op):
    """A bf16-autocast model's hidden states (bf16) against float32 bases: the op runs as on both
    cast to bf16, and the float32 bases get a float32 gradient."""
    layer = torch.nn.Linear(19, 19)
    x = make(23, 19)
    bases = make(131, 19, requires_grad=True)
    targets = make_targets((23,), 131)

    def run(h, b):
        if op == "cross_entropy":
            return vf.similarity_cross_entropy(h, b, targets, scale=5.0, impl=impl)
        if op == "logits":
            return vf.similarity_logits(h, b, scale=5.0, impl=impl).float().square().mean()
        return vf.similarity_topk(h, b, 3, scale=5.0, impl=impl)[0].sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = layer(x)
        assert hidden.dtype == torch.bfloat16
        out = run(hidden, bases)
    out.backward()
    expected_bases = leaf(bases, torch.bfloat16)
    expected = run(hidden.detach(), expected_bases)
    expected.backward()
    assert_close(out, expected, rtol=0, atol=0, name="value")
    assert bases.grad.dtype == torch.float32
    assert_close(bases.grad, expected_bases.grad.float(), rtol=0, atol=0, name="bases.grad")


# --- NaN and overflow (nan_and_overflow_cases.py states the contract) ---------------------------
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_ranks_first_in_topk(impl, k):
    nan_and_overflow_cases.check_nan_topk(impl, "cpu", k)


@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_in_hard_assignment(impl):
    nan_and_overflow_cases.check_nan_hard_assignment(impl, "cpu")


@pytest.mark.parametrize("impl", BACKENDS)
def test_infinite_entries_give_nan_in_their_rows(impl):
    nan_and_overflow_cases.check_infinite_entries(impl, "cpu")


@pytest.mark.parametrize("strip_plan", ["rows", "columns"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_overflowing_norms_score_zero_not_nan(impl, strip_plan):
    """fp32 rows near 1e30: the cpu loss with gradients was NaN (a raw product overflowed, then x 0)."""
    nan_and_overflow_cases.check_overflow_scores_zero(impl, "cpu", strip_plan)


@pytest.mark.parametrize("impl", BACKENDS)
def test_large_raw_logits_backward_as_precise_as_the_reference(impl):
    """Raw dot-product logits near 1e3: the torch backend's backward took exp(z - lse) with the
    float32 lse, whose rounding (3e-5) put its gradient error at twice the reference's."""
    hidden64, bases64 = make(64, 32, dtype=torch.float64) * 6, make(500, 32, dtype=torch.float64) * 6
    targets = make_targets((64,), 500, ignored=0.0)

    def grads(dtype, fn):
        h, b = leaf(hidden64, dtype), leaf(bases64, dtype)
        fn(h, b).backward()
        return h.grad.double(), b.grad.double()

    kwargs = dict(normalize=False, reduction="sum")
    truth = grads(torch.float64, lambda h, b: ref.similarity_cross_entropy(h, b, targets, **kwargs))
    reference = grads(torch.float32, lambda h, b: ref.similarity_cross_entropy(h, b, targets, **kwargs))
    fused = grads(torch.float32, lambda h, b: vf.similarity_cross_entropy(h, b, targets, impl=impl, **kwargs))
    for name, got, want, exact in zip(("hidden", "bases"), fused, reference, truth):
        err, ref_err = (got - exact).abs().max().item(), (want - exact).abs().max().item()
        assert err <= 1.25 * ref_err + 1e-6, f"{name} grad: error {err:.2e}, the reference's {ref_err:.2e}"


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_a_nan_row_whose_target_is_ignored(impl, reduction, label_smoothing):
    """An ignored row holding NaN: every backend as the reference (the row contributes 0)."""
    hidden, bases = make(6, 9), make(40, 9)
    hidden[2, 4] = float("nan")
    targets = torch.tensor([1, 5, -100, 7, 0, 39])
    kwargs = dict(scale=6.0, reduction=reduction, label_smoothing=label_smoothing)
    got = vf.similarity_cross_entropy(hidden, bases, targets, impl=impl, **kwargs)
    expected = ref.similarity_cross_entropy(hidden, bases, targets, **kwargs)
    assert_close(got, expected, rtol=1e-5, atol=1e-5, name="loss")
    assert bool(torch.isfinite(got).all())
