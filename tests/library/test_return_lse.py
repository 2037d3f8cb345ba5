"""``similarity_cross_entropy(..., return_lse=True)``: the per-row log-sum-exp of the similarity
logits, its value and its gradient (alone and together with the loss's) against the reference,
for every backend, with ignored rows, label smoothing and every reduction."""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends.tiles import tile_config

from helpers import BACKENDS, assert_matches, leaf, make, make_targets, tiles

TOL = 2e-5


def _reference(hidden, bases, targets, **kwargs):
    """The reference loss and the log-sum-exp of the materialised float32 logits."""
    loss = ref.similarity_cross_entropy(hidden, bases, targets, **kwargs)
    similarity = {k: kwargs[k] for k in ("scale", "normalize", "eps") if k in kwargs}
    logits = ref.similarity_logits(hidden, bases, **similarity)
    lse = torch.logsumexp(logits.to(loss.dtype).reshape(-1, bases.shape[0]), dim=-1).reshape(targets.shape)
    return loss, lse


def _objective(loss, lse, mix, lse_upstream):
    """A scalar from the two outputs: the loss alone, the log-sum-exp alone, or both (a z-loss)."""
    loss_part = loss.sum() if loss.dim() else loss
    lse_part = (lse * lse_upstream).sum() + 0.1 * lse.square().mean()
    return {"loss": loss_part, "lse": lse_part, "both": 0.7 * loss_part + lse_part}[mix]


@pytest.mark.parametrize("mix", ["loss", "lse", "both"])
@pytest.mark.parametrize("reduction,label_smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.2)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_lse_value_and_gradients_match_reference(impl, tile, normalize, reduction, label_smoothing, mix):
    lead, d, v = (3, 7), 59, 1025
    scale = 20.0 if normalize else 0.5
    hidden, bases = make(*lead, d, requires_grad=True), make(v, d, requires_grad=True)
    rh, rb = leaf(hidden), leaf(bases)
    targets = make_targets(lead, v, ignored=0.3)
    kwargs = dict(scale=scale, normalize=normalize, reduction=reduction, label_smoothing=label_smoothing)
    lse_upstream = torch.rand(lead) + 0.5
    with tiles(tile):
        loss, lse = vf.similarity_cross_entropy(hidden, bases, targets, impl=impl, return_lse=True, **kwargs)
        expected_loss, expected_lse = _reference(rh, rb, targets, **kwargs)
        assert lse.shape == targets.shape and lse.dtype == torch.float32
        assert_matches(loss, expected_loss, tol=TOL, name="loss")
        assert_matches(lse, expected_lse, tol=TOL, name="lse (ignored rows included)")
        _objective(loss, lse, mix, lse_upstream).backward()
        _objective(expected_loss, expected_lse, mix, lse_upstream).backward()
    scale_of_grads = max(1.0, float(rh.grad.abs().max()), float(rb.grad.abs().max()))
    assert_matches(hidden.grad, rh.grad, tol=TOL * scale_of_grads * 10, name="hidden grad")
    assert_matches(bases.grad, rb.grad, tol=TOL * scale_of_grads * 10, name="bases grad")


@pytest.mark.parametrize("impl", BACKENDS)
def test_loss_is_the_same_with_and_without_lse(impl):
    hidden, bases = make(23, 31), make(300, 31)
    targets = make_targets((23,), 300)
    plain = vf.similarity_cross_entropy(hidden, bases, targets, scale=5.0, impl=impl)
    loss, _ = vf.similarity_cross_entropy(hidden, bases, targets, scale=5.0, impl=impl, return_lse=True)
    assert torch.equal(plain, loss)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_loss_and_lse(impl, normalize, label_smoothing):
    hidden = make(5, 6, dtype=torch.float64, requires_grad=True)
    bases = make(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 12, 0, -100])
    weights = torch.rand(5, dtype=torch.float64)

    def fn(h, b):
        loss, lse = vf.similarity_cross_entropy(h, b, targets, scale=3.0, normalize=normalize,
                                                label_smoothing=label_smoothing, impl=impl, return_lse=True)
        return loss + (weights * lse).sum() + 0.05 * lse.square().sum()

    with tile_config(max_elements=8, max_rows=2, min_columns=3):
        assert torch.autograd.gradcheck(fn, (hidden, bases), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
def test_second_backward_through_loss_and_lse(impl):
    """Gradients formed in the forward pass are handed over once; a second backward through the
    loss and the log-sum-exp (retain_graph) must equal the first."""
    hidden, bases = make(9, 13, requires_grad=True), make(31, 13, requires_grad=True)
    targets = make_targets((9,), 31)
    loss, lse = vf.similarity_cross_entropy(hidden, bases, targets, scale=4.0, impl=impl, return_lse=True)
    objective = 2.0 * loss + lse.square().mean()
    objective.backward(retain_graph=True)
    first = hidden.grad.clone(), bases.grad.clone()
    hidden.grad = bases.grad = None
    objective.backward()
    torch.testing.assert_close(hidden.grad, first[0])
    torch.testing.assert_close(bases.grad, first[1])


def test_return_lse_must_be_a_bool():
    with pytest.raises(TypeError, match="return_lse"):
        vf.similarity_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), return_lse="yes")
