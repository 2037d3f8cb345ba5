"""The public similarity ops, each a ``torch.library`` custom op with a fake implementation and a
registered autograd formula (its backward is itself a custom op).

The Python wrappers check arguments (shapes, dtypes, devices: no host sync), pick the backend
for ``impl=`` and flatten leading dimensions; the ops run the chosen backend. Because the ops are
opaque to the compiler, ``torch.compile(fullgraph=True)`` captures a call as one node.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backends
from ._validation import (
    check_assign_pair,
    check_bool,
    check_class_weight,
    check_float,
    check_int,
    check_number,
    check_pair,
    check_reduction,
    check_target_range,
    check_targets,
)
from .backends.normalization import inverse_norms, normalization_backward
from .options import LossOptions, SimilarityOptions, accumulate_dtype

__all__ = ["similarity_logits", "similarity_cross_entropy", "SimilarityCrossEntropyLoss", "similarity_topk", "assign"]

_LIB = "vocabsem_fast"


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors, not None: an unneeded gradient travels as an empty tensor."""
    return grad if grad is not None else like.new_empty(0)


def _fake_grads(hidden: Tensor, bases: Tensor, need_hidden: bool, need_bases: bool) -> tuple[Tensor, Tensor]:
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        bases.new_empty(bases.shape if need_bases else (0,)),
    )


def _needed(ctx, dh: Tensor, db: Tensor, n_rest: int) -> tuple:
    needs_hidden, needs_bases = ctx.needs_input_grad[:2]
    return (dh if needs_hidden else None, db if needs_bases else None) + (None,) * n_rest


# --- similarity logits ----------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::similarity_logits", mutates_args=())
def _logits_op(hidden: Tensor, bases: Tensor, scale: float, normalize: bool, eps: float, impl: str) -> Tensor:
    return backends.select(impl, "logits", hidden.device, hidden.dtype).logits(
        hidden, bases, SimilarityOptions(scale, normalize, eps))


@_logits_op.register_fake
def _(hidden, bases, scale, normalize, eps, impl):
    return hidden.new_empty(hidden.shape[0], bases.shape[0])


@torch.library.custom_op(f"{_LIB}::similarity_logits_backward", mutates_args=())
def _logits_backward_op(
    grad: Tensor, hidden: Tensor, bases: Tensor, scale: float, normalize: bool, eps: float, impl: str,
    need_hidden: bool, need_bases: bool,
) -> tuple[Tensor, Tensor]:
    dh, db = backends.select(impl, "logits", hidden.device, hidden.dtype).logits_backward(
        grad, hidden, bases, SimilarityOptions(scale, normalize, eps), need_hidden, need_bases
    )
    return _or_empty(dh, hidden), _or_empty(db, bases)


@_logits_backward_op.register_fake
def _(grad, hidden, bases, scale, normalize, eps, impl, need_hidden, need_bases):
    return _fake_grads(hidden, bases, need_hidden, need_bases)


def _logits_setup(ctx, inputs, output):
    hidden, bases, *options = inputs
    ctx.save_for_backward(hidden, bases)
    ctx.options = options


def _logits_autograd(ctx, grad):
    hidden, bases = ctx.saved_tensors
    dh, db = _logits_backward_op(grad, hidden, bases, *ctx.options, *ctx.needs_input_grad[:2])
    return _needed(ctx, dh, db, len(ctx.options))


_logits_op.register_autograd(_logits_autograd, setup_context=_logits_setup)


# --- similarity cross-entropy ---------------------------------------------------------------------
# The kernels compute each row's plain loss L_i = lse_i - (1 - ls) z[i, t_i] - ls / V sum_j z[i, j]
# and its log-sum-exp. Class weights and the z-loss are assembled from those two and, for class
# weights with label smoothing (F.cross_entropy weighs the smoothing sum class by class), from the
# weighted score sum S_i = sum_j w_j z[i, j], a rank-one term. Every addition is O((N + V) d).
@dataclass(frozen=True)
class _LossTerms:
    smoothing: float
    z_loss: float
    weighted: bool

    @property
    def kernel_smoothing(self) -> float:
        """With class weights the kernels run unsmoothed: the smoothing sum is weighted per class."""
        return 0.0 if self.weighted else self.smoothing

    @property
    def weighted_smoothing(self) -> bool:
        return self.weighted and self.smoothing > 0

    @property
    def plain(self) -> bool:
        """The row loss is the kernels' L_i itself."""
        return not self.weighted and self.z_loss == 0

    @property
    def kernel_factor(self) -> float:
        return 1.0 - self.smoothing if self.weighted else 1.0

    @property
    def uses_lse(self) -> bool:
        """The row loss depends on lse beyond L_i (so its gradient needs the recomputing pass)."""
        return self.z_loss != 0 or self.weighted_smoothing


def _row_weights(targets: Tensor, valid: Tensor, class_weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Each row's weight: w[t_i] (1 without class weights), 0 where the target is ignored."""
    weights = valid.to(dtype)
    if class_weight is not None:
        weights = weights * class_weight.to(dtype)[torch.where(valid, targets, 0)]
    return weights


def _mean_divisor(row_weights: Tensor) -> Tensor:
    """The summed weights of the non-ignored rows; 1 when they sum to zero (the loss is then 0.0)."""
    total = row_weights.sum()
    return torch.where(total == 0, torch.ones_like(total), total)


def _reduce_rows(per_row: Tensor, row_weights: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / _mean_divisor(row_weights)


def _row_gradient(grad: Tensor, row_weights: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """The upstream gradient of each row's (assembled) loss, zero for ignored rows."""
    if reduction == "mean":
        grad = grad / _mean_divisor(row_weights).to(grad.dtype)
    return torch.where(valid, grad.expand(valid.shape), 0.0)


def _weighted_basis_sum(bases: Tensor, class_weight: Tensor | None, inv_b: Tensor | None) -> Tensor:
    """sum_j w_j bn_j (float32 or float64, (d,)), a V-chunk of the bases at a time (bn_j = b_j
    without ``inv_b``)."""
    acc = accumulate_dtype(bases.dtype)
    total = torch.zeros(bases.shape[1], dtype=acc, device=bases.device)
    step = 1 << 14
    for c0 in range(0, bases.shape[0], step):
        coefficients = None if inv_b is None else inv_b[c0:c0 + step]
        if class_weight is not None:
            w = class_weight[c0:c0 + step].to(acc)
            coefficients = w if coefficients is None else coefficients * w
        chunk = bases[c0:c0 + step].to(acc)
        total += chunk.sum(0) if coefficients is None else coefficients @ chunk
    return total


def _weighted_score_sums(hidden: Tensor, bases: Tensor, class_weight: Tensor, sim: SimilarityOptions) -> Tensor:
    """S_i = sum_j w_j z[i, j] = scale * hn_i . sum_j w_j bn_j."""
    inv_b = inverse_norms(bases, sim.eps) if sim.normalize else None
    total = _weighted_basis_sum(bases, class_weight, inv_b)
    sums = hidden.to(total.dtype) @ total
    if sim.normalize:
        sums = sums * inverse_norms(hidden, sim.eps)
    return sim.scale * sums


def _cross_entropy_backend(impl: str, hidden: Tensor) -> backends.Backend:
    return backends.select(impl, "cross_entropy", hidden.device, hidden.dtype)


def _forward_gradients(backend: backends.Backend, reduction: str, terms: _LossTerms, grad_hidden: bool,
                       grad_bases: bool) -> tuple[bool, bool]:
    """Which gradients the cross-entropy op returns from its forward pass: those asked for, when
    the loss is reduced, its rows are weighted copies of L_i and the backend forms them there
    (data-independent, so the fake agrees)."""
    early = reduction != "none" and not terms.uses_lse and backend.capabilities.gradients_in_forward
    return early and grad_hidden, early and grad_bases


@torch.library.custom_op(f"{_LIB}::similarity_cross_entropy", mutates_args=())
def _cross_entropy_op(
    hidden: Tensor, bases: Tensor, targets: Tensor, class_weight: Tensor | None, scale: float, normalize: bool,
    eps: float, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, impl: str,
    grad_hidden: bool, grad_bases: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, d loss/d hidden, d loss/d bases). ``grad_*`` ask for the gradients of a reduced
    loss from the forward pass; a backend that cannot (or "none") returns empty ones and the
    backward op recomputes."""
    check_target_range(targets, bases.shape[0], ignore_index)
    backend = _cross_entropy_backend(impl, hidden)
    terms = _LossTerms(label_smoothing, z_loss, class_weight is not None)
    early_hidden, early_bases = _forward_gradients(backend, reduction, terms, grad_hidden, grad_bases)
    acc = accumulate_dtype(hidden.dtype)
    valid = targets != ignore_index
    row_weights = _row_weights(targets, valid, class_weight, acc)
    upstream = None
    if early_hidden or early_bases:
        upstream = _row_gradient(torch.ones((), dtype=acc, device=hidden.device), row_weights, valid,
                                 reduction) * row_weights
    sim = SimilarityOptions(scale, normalize, eps)
    per_row, lse, dh, db = backend.cross_entropy(
        hidden, bases, targets, sim, LossOptions(ignore_index, terms.kernel_smoothing), upstream, early_hidden,
        early_bases,
    )
    if not terms.plain:
        rows = per_row * (row_weights * terms.kernel_factor)
        if terms.weighted_smoothing:
            total_weight = class_weight.to(acc).sum()
            rows = rows + (label_smoothing / bases.shape[0]) * (
                total_weight * lse - _weighted_score_sums(hidden, bases, class_weight, sim))
        if z_loss:
            rows = rows + z_loss * row_weights * lse.square()
        per_row = torch.where(valid, rows, 0.0)
    return _reduce_rows(per_row, row_weights, reduction), lse, _or_empty(dh, hidden), _or_empty(db, bases)


@_cross_entropy_op.register_fake
def _(hidden, bases, targets, class_weight, scale, normalize, eps, ignore_index, reduction, label_smoothing, z_loss,
      impl, grad_hidden, grad_bases):
    acc = accumulate_dtype(hidden.dtype)
    n = hidden.shape[0]
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=acc)
    terms = _LossTerms(label_smoothing, z_loss, class_weight is not None)
    dh, db = _fake_grads(hidden, bases, *_forward_gradients(_cross_entropy_backend(impl, hidden), reduction, terms,
                                                            grad_hidden, grad_bases))
    return loss, hidden.new_empty(n, dtype=acc), dh, db


@torch.library.custom_op(f"{_LIB}::similarity_cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    row_weight: Tensor, hidden: Tensor, bases: Tensor, targets: Tensor, lse: Tensor, scale: float, normalize: bool,
    eps: float, ignore_index: int, label_smoothing: float, impl: str, need_hidden: bool, need_bases: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_i row_weight_i * L_i`` (``row_weight`` zero where the target is ignored)."""
    dh, db = _cross_entropy_backend(impl, hidden).cross_entropy_backward(
        row_weight, hidden, bases, targets, lse, SimilarityOptions(scale, normalize, eps),
        LossOptions(ignore_index, label_smoothing), need_hidden, need_bases,
    )
    return _or_empty(dh, hidden), _or_empty(db, bases)


@_cross_entropy_backward_op.register_fake
def _(row_weight, hidden, bases, targets, lse, scale, normalize, eps, ignore_index, label_smoothing, impl,
      need_hidden, need_bases):
    return _fake_grads(hidden, bases, need_hidden, need_bases)


def _extra_terms_backward(target_coefficient: Tensor | None, sums_coefficient: Tensor | None, hidden: Tensor,
                          bases: Tensor, targets: Tensor, class_weight: Tensor | None, sim: SimilarityOptions,
                          need_hidden: bool, need_bases: bool):
    """Gradients of ``sum_i a_i z[i, t_i] + sum_i e_i sum_j w_j z[i, j]`` (``a``, ``e`` the two
    coefficients, either absent; w = 1 without class weights), in O((N + V) d): the target term
    gathers one basis per row, the weighted sum is rank one on each side. Both are formed w.r.t.
    the normalised vectors and taken through the normalisation once per side: separately, each
    would be multiplied by 1/eps at a zero vector and what cancels between them would not."""
    acc = accumulate_dtype(hidden.dtype)
    inv_h = inverse_norms(hidden, sim.eps) if sim.normalize else None
    inv_b = inverse_norms(bases, sim.eps) if sim.normalize else None
    dh = db = None
    if need_hidden:
        dhn = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        if target_coefficient is not None:
            picked = bases[targets].to(acc)
            scale = target_coefficient if inv_b is None else target_coefficient * inv_b[targets]
            dhn.addcmul_(scale[:, None], picked)
        if sums_coefficient is not None:
            total = _weighted_basis_sum(bases, class_weight, inv_b)
            dhn.addcmul_(sums_coefficient[:, None], total[None, :])
        dhn.mul_(sim.scale)
        dh = (dhn if inv_h is None else normalization_backward(hidden, inv_h, dhn, sim.eps, out=dhn)).to(hidden.dtype)
    if need_bases:
        hn = hidden.to(acc) if inv_h is None else hidden.to(acc) * inv_h[:, None]
        if sums_coefficient is not None:
            row = (sums_coefficient[:, None] * hn).sum(0) * sim.scale
            dbn = row.expand(bases.shape).contiguous() if class_weight is None else \
                class_weight.to(acc)[:, None] * row[None, :]
        else:
            dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device)
        if target_coefficient is not None:
            dbn.index_add_(0, targets, (sim.scale * target_coefficient)[:, None] * hn)
        db = (dbn if inv_b is None else normalization_backward(bases, inv_b, dbn, sim.eps, out=dbn)).to(bases.dtype)
    return dh, db


def _cross_entropy_setup(ctx, inputs, output):
    hidden, bases, targets, class_weight, scale, normalize, eps, ignore_index, reduction, smoothing, z_loss, impl, \
        grad_hidden, grad_bases = inputs
    ctx.options = (scale, normalize, eps, ignore_index, reduction, smoothing, impl)
    ctx.terms = _LossTerms(smoothing, z_loss, class_weight is not None)
    ctx.n_inputs = len(inputs)
    loss, lse, dh, db = output
    ctx.mark_non_differentiable(dh, db)
    # Unused outputs get None as their gradient, not zeros: zeros_like(db) would be a V x d buffer.
    ctx.set_materialize_grads(False)
    precomputed = any(_forward_gradients(_cross_entropy_backend(impl, hidden), reduction, ctx.terms, grad_hidden,
                                         grad_bases))
    # In eager mode gradients formed in the forward pass stay outside the saved tensors: the first
    # backward scales them in place and drops them, so no second gradient-sized buffer exists (a
    # later backward under retain_graph finds none and recomputes). Tracers (torch.compile,
    # opcheck) see subclass tensors and get the plain saved-tensor form, which they optimise.
    eager = type(dh) is torch.Tensor
    ctx.early_grads = (dh, db) if precomputed and eager else None
    ctx.saved_early = precomputed and not eager
    ctx.save_for_backward(hidden, bases, targets, lse, class_weight, *((dh, db) if ctx.saved_early else ()))


def _cross_entropy_autograd(ctx, grad_loss, grad_lse, grad_dh, grad_db):
    hidden, bases, targets, lse, class_weight, *saved = ctx.saved_tensors
    early, ctx.early_grads = ctx.early_grads, None
    scale, normalize, eps, ignore_index, reduction, smoothing, impl = ctx.options
    terms = ctx.terms
    need_hidden, need_bases = ctx.needs_input_grad[:2]
    rest = ctx.n_inputs - 2  # inputs after hidden and bases: never differentiable
    if grad_loss is None and grad_lse is None:  # neither output was used: nothing flows back
        return (None,) * ctx.n_inputs
    if grad_lse is None and (early is not None or saved):  # a reduced loss: the upstream gradient is a scalar
        # The scalar stays in the accumulation dtype: a GradScaler's 65536 is inf in float16, and
        # a gradient that overflowed in the input dtype (all-zero bases: 1/eps) times a zero
        # upstream is zero, as the exact product is.
        zero = grad_loss == 0
        if early is not None:
            dh, db = (g.mul_(grad_loss).masked_fill_(zero, 0) for g in early)
        else:
            dh, db = ((g * grad_loss).masked_fill_(zero, 0) for g in saved)
        return _needed(ctx, dh, db, rest)
    # One recomputing pass (also when the log-sum-exp is used and the loss's gradients came from
    # the forward pass: every backward of the graph then takes the same path, so a second one
    # under retain_graph gives the same bits). Each row's loss is a combination of L_i, lse_i and
    # S_i; the pass takes L_i's and lse_i's coefficients together (lse_i = L_i + target terms for
    # any valid t_i, so rows whose lse is used get target 0 where theirs is ignored), and the
    # target terms and S_i's rank-one term are added in O((N + V) d).
    acc = lse.dtype
    valid = targets != ignore_index
    row_weights = _row_weights(targets, valid, class_weight, acc)
    g = torch.zeros_like(lse) if grad_loss is None else _row_gradient(grad_loss.to(acc), row_weights, valid,
                                                                      reduction)
    weight = g * row_weights * terms.kernel_factor if terms.weighted else g
    lse_coefficient = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(acc)
    if terms.z_loss:
        lse_coefficient = lse_coefficient + (2.0 * terms.z_loss) * g * row_weights * lse
    if terms.weighted_smoothing:
        lse_coefficient = lse_coefficient + g * (smoothing * class_weight.to(acc).sum() / bases.shape[0])
    pass_targets, pass_ignore = targets, ignore_index
    if grad_lse is not None or terms.uses_lse:
        weight = weight + lse_coefficient
        pass_targets, pass_ignore = torch.where(valid, targets, 0), -1
    rh, rb = _cross_entropy_backward_op(weight, hidden, bases, pass_targets, lse, scale, normalize, eps, pass_ignore,
                                        terms.kernel_smoothing, impl, need_hidden, need_bases)
    dh, db = (rh if need_hidden else None), (rb if need_bases else None)
    # what lse_i adds beyond L_i (its target terms), and the weighted smoothing sum S_i
    target_coefficient = sums_coefficient = None
    if grad_lse is not None or terms.uses_lse:
        target_coefficient = lse_coefficient * (1.0 - terms.kernel_smoothing)
        if terms.kernel_smoothing:
            sums_coefficient = lse_coefficient * (terms.kernel_smoothing / bases.shape[0])
    if terms.weighted_smoothing:
        sums_coefficient = g * (-smoothing / bases.shape[0])
    if target_coefficient is not None or sums_coefficient is not None:
        th, tb = _extra_terms_backward(target_coefficient, sums_coefficient, hidden, bases, pass_targets,
                                       class_weight if terms.weighted_smoothing else None,
                                       SimilarityOptions(scale, normalize, eps), need_hidden, need_bases)
        dh = dh + th if need_hidden else None
        db = db + tb if need_bases else None
    return _needed(ctx, dh, db, rest)


_cross_entropy_op.register_autograd(_cross_entropy_autograd, setup_context=_cross_entropy_setup)


# --- top-k ----------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::similarity_topk", mutates_args=())
def _topk_op(
    hidden: Tensor, bases: Tensor, k: int, scale: float, normalize: bool, eps: float, impl: str
) -> tuple[Tensor, Tensor]:
    backend = backends.select(impl, "topk", hidden.device, hidden.dtype, k=k, scale=scale)
    return backend.topk(hidden, bases, k, SimilarityOptions(scale, normalize, eps))


@_topk_op.register_fake
def _(hidden, bases, k, scale, normalize, eps, impl):
    shape = (hidden.shape[0], k)
    return hidden.new_empty(shape, dtype=accumulate_dtype(hidden.dtype)), hidden.new_empty(shape, dtype=torch.long)


@torch.library.custom_op(f"{_LIB}::similarity_topk_backward", mutates_args=())
def _topk_backward_op(
    grad: Tensor, hidden: Tensor, bases: Tensor, indices: Tensor, scale: float, normalize: bool, eps: float,
    impl: str, need_hidden: bool, need_bases: bool,
) -> tuple[Tensor, Tensor]:
    backend = backends.select(impl, "topk", hidden.device, hidden.dtype, k=indices.shape[1], scale=scale)
    dh, db = backend.topk_backward(
        grad, hidden, bases, indices, SimilarityOptions(scale, normalize, eps), need_hidden, need_bases
    )
    return _or_empty(dh, hidden), _or_empty(db, bases)


@_topk_backward_op.register_fake
def _(grad, hidden, bases, indices, scale, normalize, eps, impl, need_hidden, need_bases):
    return _fake_grads(hidden, bases, need_hidden, need_bases)


def _topk_setup(ctx, inputs, output):
    hidden, bases, k, *options = inputs
    values, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(hidden, bases, indices)
    ctx.options = options


def _topk_autograd(ctx, grad_values, grad_indices):
    hidden, bases, indices = ctx.saved_tensors
    dh, db = _topk_backward_op(grad_values, hidden, bases, indices, *ctx.options, *ctx.needs_input_grad[:2])
    return _needed(ctx, dh, db, 1 + len(ctx.options))


_topk_op.register_autograd(_topk_autograd, setup_context=_topk_setup)


# --- batched hard assignment ------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::batched_argmax", mutates_args=())
def _batched_argmax_op(points: Tensor, centroids: Tensor, normalize: bool, eps: float,
                       impl: str) -> tuple[Tensor, Tensor]:
    """(scores, indices) of each point's best centroid, for B problems in one call (values first,
    as the top-k op returns them)."""
    backend = backends.select(impl, "batched_argmax", points.device, points.dtype)
    indices, scores = backend.batched_argmax(points, centroids, SimilarityOptions(1.0, normalize, eps))
    return scores, indices


@_batched_argmax_op.register_fake
def _(points, centroids, normalize, eps, impl):
    shape = points.shape[:2]
    return points.new_empty(shape, dtype=accumulate_dtype(points.dtype)), points.new_empty(shape, dtype=torch.long)


def _batched_argmax_setup(ctx, inputs, output):
    points, centroids, normalize, eps, _ = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(points, centroids, indices)
    ctx.normalize, ctx.eps = normalize, eps


def _batched_argmax_autograd(ctx, grad_scores, grad_indices):
    """The top-1 backward of each problem: row norms are per row, so the B problems are one top-k
    of (B N) rows against (B K) centroids whose chosen indices are offset by problem."""
    points, centroids, indices = ctx.saved_tensors
    if grad_scores is None:
        return None, None, None, None, None
    batch, n, d = points.shape
    chosen = indices + torch.arange(batch, device=points.device)[:, None] * centroids.shape[1]
    dp, dc = backends.get("torch").topk_backward(
        grad_scores.reshape(-1, 1), points.reshape(-1, d), centroids.reshape(-1, d), chosen.reshape(-1, 1),
        SimilarityOptions(1.0, ctx.normalize, ctx.eps), *ctx.needs_input_grad[:2])
    return (None if dp is None else dp.view(points.shape), None if dc is None else dc.view(centroids.shape),
            None, None, None)


_batched_argmax_op.register_autograd(_batched_argmax_autograd, setup_context=_batched_argmax_setup)


# --- soft assignment ------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::soft_assign", mutates_args=())
def _soft_assign_op(
    points: Tensor, centroids: Tensor, inv_temperature: float, normalize: bool, eps: float, impl: str
) -> Tensor:
    backend = backends.select(impl, "soft_assign", points.device, points.dtype, k=centroids.shape[1])
    return backend.soft_assign(points, centroids, SimilarityOptions(inv_temperature, normalize, eps))


@_soft_assign_op.register_fake
def _(points, centroids, inv_temperature, normalize, eps, impl):
    shape = (points.shape[0], points.shape[1], centroids.shape[1])
    return points.new_empty(shape, dtype=accumulate_dtype(points.dtype))


@torch.library.custom_op(f"{_LIB}::soft_assign_backward", mutates_args=())
def _soft_assign_backward_op(
    grad: Tensor, probs: Tensor, points: Tensor, centroids: Tensor, inv_temperature: float, normalize: bool,
    eps: float, impl: str, need_points: bool, need_centroids: bool,
) -> tuple[Tensor, Tensor]:
    backend = backends.select(impl, "soft_assign", points.device, points.dtype, k=centroids.shape[1])
    dp, dc = backend.soft_assign_backward(
        grad, probs, points, centroids, SimilarityOptions(inv_temperature, normalize, eps), need_points, need_centroids
    )
    return _or_empty(dp, points), _or_empty(dc, centroids)


@_soft_assign_backward_op.register_fake
def _(grad, probs, points, centroids, inv_temperature, normalize, eps, impl, need_points, need_centroids):
    return _fake_grads(points, centroids, need_points, need_centroids)


def _soft_assign_setup(ctx, inputs, output):
    points, centroids, *options = inputs
    ctx.save_for_backward(points, centroids, output)
    ctx.options = options


def _soft_assign_autograd(ctx, grad):
    points, centroids, probs = ctx.saved_tensors
    dp, dc = _soft_assign_backward_op(grad, probs, points, centroids, *ctx.options, *ctx.needs_input_grad[:2])
    return _needed(ctx, dp, dc, len(ctx.options))


_soft_assign_op.register_autograd(_soft_assign_autograd, setup_context=_soft_assign_setup)


# --- public functions -----------------------------------------------------------------------------
def _similarity_args(scale, normalize, eps) -> tuple[float, bool, float]:
    return (
        check_number(scale, "scale"),
        check_bool(normalize, "normalize"),
        check_number(eps, "eps", positive=True),
    )


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``x`` runs in under the autocast active for its device, or None where autocast
    is off (float64 stays as autocast leaves it)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.dtype


def _autocast_pair(hidden, bases):
    """``(hidden, bases, context)``: under ``torch.autocast`` the pair runs in the autocast dtype,
    as a matmul would (a bf16 model's hidden states meet float32 bases; gradients flow back
    through the casts), and the op itself runs in ``context``, with autocast off, so that its own
    float32 arithmetic stays float32."""
    if not (isinstance(hidden, Tensor) and isinstance(bases, Tensor)):
        return hidden, bases, contextlib.nullcontext()  # check_pair names the argument
    dtype = autocast_dtype(hidden)
    if dtype is None:
        return hidden, bases, contextlib.nullcontext()
    bases_dtype = autocast_dtype(bases) or bases.dtype
    return hidden.to(dtype), bases.to(bases_dtype), torch.autocast(hidden.device.type, enabled=False)


def similarity_logits(
    hidden: Tensor, bases: Tensor, *, scale: float = 1.0, normalize: bool = True, eps: float = 1e-8,
    impl: str = "auto",
) -> Tensor:
    """Similarity logits ``scale * cos(hidden, bases)`` (``scale * hidden @ bases.T`` when
    ``normalize=False``).

    hidden: (..., d), bases: (V, d), same floating dtype and device. Returns (..., V) in that
    dtype (accumulated in float32). Differentiable in ``hidden`` and ``bases``.
    """
    hidden, bases, context = _autocast_pair(hidden, bases)
    check_pair(hidden, bases)
    options = _similarity_args(scale, normalize, eps)
    backend = backends.resolve(impl, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    with context:
        out = _logits_op(flat, bases, *options, backend)
    return out.reshape(*hidden.shape[:-1], bases.shape[0])


@dataclass(frozen=True)
class CrossEntropyCall:
    """The checked arguments of a cross-entropy call (shared with the distributed loss)."""

    scale: float
    normalize: bool
    eps: float
    ignore_index: int
    reduction: str
    label_smoothing: float


def check_cross_entropy_args(hidden, bases, targets, *, scale, normalize, ignore_index, reduction, label_smoothing,
                             eps, allow_empty_bases: bool = False) -> CrossEntropyCall:
    """Checks shapes, dtypes, devices and options (no host sync); raises naming the argument."""
    check_pair(hidden, bases, allow_empty=allow_empty_bases)
    check_targets(targets, hidden)
    scale, normalize, eps = _similarity_args(scale, normalize, eps)
    return CrossEntropyCall(
        scale, normalize, eps, check_int(ignore_index, "ignore_index"), check_reduction(reduction),
        check_number(label_smoothing, "label_smoothing", low=0.0, high=1.0),
    )


def similarity_cross_entropy(
    hidden: Tensor, bases: Tensor, targets: Tensor, *, scale: float = 1.0, normalize: bool = True,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-8,
    impl: str = "auto", weight: Tensor | None = None, z_loss: float = 0.0, return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of the similarity logits without ever holding the N x V logits.

    Equals ``F.cross_entropy(similarity_logits(hidden, bases, ...).float().view(-1, V),
    targets.view(-1), weight=..., ignore_index=..., reduction=..., label_smoothing=...)`` in value
    and in its gradients w.r.t. ``hidden`` (..., d) and ``bases`` (V, d). ``targets`` has shape
    ``hidden.shape[:-1]``. "mean" divides by the summed weights of the non-ignored targets (their
    number without ``weight``) and is 0.0 (zero gradients) when that is zero. The loss is float32
    (float64 for float64 inputs).

    ``weight``: optional (V,) per-class weights, as in ``F.cross_entropy`` (not differentiated).
    ``z_loss``: adds ``w[t] * z_loss * lse**2`` to each non-ignored row (PaLM's auxiliary loss,
    which keeps the log-sum-exp near zero), reduced with the loss.
    ``return_lse=True`` returns ``(loss, lse)``: ``lse`` (shape of ``targets``, float32) is each
    row's log-sum-exp of the similarity logits, ignored rows included, and is differentiable.

    Cost: plain and class-weighted losses form their gradients in the forward pass where the
    backend can (three GEMMs in all); a z-loss, or class weights with label smoothing, take one
    recomputing backward pass (four).
    """
    hidden, bases, context = _autocast_pair(hidden, bases)
    call = check_cross_entropy_args(hidden, bases, targets, scale=scale, normalize=normalize,
                                    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                    eps=eps)
    if weight is not None:
        check_class_weight(weight, bases)
    z_loss = check_number(z_loss, "z_loss", low=0.0)
    return_lse = check_bool(return_lse, "return_lse")
    backend = backends.resolve(impl, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    want = torch.is_grad_enabled()
    with context:
        loss, lse, _, _ = _cross_entropy_op(
            flat, bases, flat_targets, None if weight is None else weight.detach(), call.scale, call.normalize,
            call.eps, call.ignore_index, call.reduction, call.label_smoothing, z_loss, backend,
            want and hidden.requires_grad, want and bases.requires_grad,
        )
    loss = loss.reshape(targets.shape) if call.reduction == "none" else loss
    return (loss, lse.reshape(targets.shape)) if return_lse else loss


class SimilarityCrossEntropyLoss(torch.nn.Module):
    """``similarity_cross_entropy`` as a module, as ``nn.CrossEntropyLoss`` is to
    ``F.cross_entropy``: ``loss_fn(hidden, bases, targets)``. The options are checked here, once;
    ``weight`` is a buffer (it follows ``.to()`` and is saved in the state dict)."""

    def __init__(self, *, scale: float = 1.0, normalize: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-8,
                 weight: Tensor | None = None, z_loss: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.scale, self.normalize, self.eps = _similarity_args(scale, normalize, eps)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.reduction = check_reduction(reduction)
        self.label_smoothing = check_number(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.z_loss = check_number(z_loss, "z_loss", low=0.0)
        if weight is not None:
            check_float(weight, "weight")
            if weight.dim() != 1:
                raise ValueError(f"weight must have shape (V,), got {tuple(weight.shape)}")
        self.register_buffer("weight", weight)
        if impl not in backends.IMPLS:
            raise ValueError(f"impl must be one of {backends.IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, hidden: Tensor, bases: Tensor, targets: Tensor) -> Tensor:
        return similarity_cross_entropy(
            hidden, bases, targets, scale=self.scale, normalize=self.normalize, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, eps=self.eps, impl=self.impl,
            weight=self.weight, z_loss=self.z_loss,
        )

    def extra_repr(self) -> str:
        extras = "".join(f", {name}={getattr(self, name)!r}" for name in ("label_smoothing", "z_loss")
                         if getattr(self, name))
        return (f"scale={self.scale}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}{extras}, impl={self.impl!r}")


def similarity_topk(
    hidden: Tensor, bases: Tensor, k: int, *, scale: float = 1.0, normalize: bool = True, eps: float = 1e-8,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The k largest similarity logits of each row and their vocabulary indices, without
    holding the N x V logits: ``torch.topk(similarity_logits(...), k, dim=-1)``.

    Returns values (..., k) float32 (float64 for float64 inputs), sorted descending, and indices
    (..., k) int64. Values are differentiable in ``hidden`` and ``bases``; ties may break either way.
    """
    hidden, bases, context = _autocast_pair(hidden, bases)
    check_pair(hidden, bases)
    k = check_int(k, "k", low=1, high=bases.shape[0])
    options = _similarity_args(scale, normalize, eps)
    backend = backends.resolve(impl, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    with context:
        values, indices = _topk_op(flat, bases, k, *options, backend)
    shape = (*hidden.shape[:-1], k)
    return values.reshape(shape), indices.reshape(shape)


def assign(
    points: Tensor, centroids: Tensor, *, temperature: float = 1.0, hard: bool = False, normalize: bool = True,
    eps: float = 1e-8, impl: str = "auto",
):
    """Assign points to centroids by cosine similarity (dot product when ``normalize=False``).

    points (N, d) with centroids (K, d), or batched (B, N, d) with (B, K, d). ``hard=False``:
    soft assignments ``softmax(scores / temperature)`` of shape (..., N, K), float32,
    differentiable in both inputs. ``hard=True``: ``(indices, scores)`` of each point's best
    centroid, shapes (..., N), computed with a running argmax so the N x K scores are never held.
    """
    check_assign_pair(points, centroids)
    temperature = check_number(temperature, "temperature", positive=True)
    hard = check_bool(hard, "hard")
    _, normalize, eps = _similarity_args(1.0, normalize, eps)
    backend = backends.resolve(impl, points.device)
    if hard:
        if points.dim() == 2:
            values, indices = _topk_op(points, centroids, 1, 1.0, normalize, eps, backend)
            return indices[:, 0], values[:, 0]
        scores, indices = _batched_argmax_op(points, centroids, normalize, eps, backend)  # every problem at once
        return indices, scores
    batched = points.dim() == 3
    probs = _soft_assign_op(
        points if batched else points[None], centroids if batched else centroids[None],
        1.0 / temperature, normalize, eps, backend,
    )
    return probs if batched else probs[0]
