"""Vocabulary-parallel similarity cross-entropy over a ``torch.distributed`` process group.

Each rank holds a contiguous shard of the bases (rows ``vocab_start .. vocab_start + V_local``);
``hidden`` and ``targets`` are the same everywhere. Per rank, the fused local op gives the
shard's log-sum-exp (``return_lse=True``, differentiable), and the global loss is assembled
from three all-reduces of N-vectors: the max and the rescaled sum of the partial log-sum-exps,
and the target logit (plus the logit sum for label smoothing). No rank holds N x V_local
scores, let alone N x V.

Gradients: every rank computes the same loss, so the all-reduced quantities pass their gradient
through unchanged to each rank's local terms; each shard's gradient is then local, and the
hidden states' gradient is summed across ranks in backward, so ``hidden.grad`` is the full
gradient on every rank. Works with gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_int
from .ops import check_cross_entropy_args
from .ops import similarity_cross_entropy as _local_cross_entropy


class _SumGradientsAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; every rank uses the result in the same loss, so each rank's share
    receives that loss's gradient as it is."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _unit(x: Tensor, normalize: bool, eps: float) -> Tensor:
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return F.normalize(x, dim=-1, eps=eps) if normalize else x


def _check_shards(vocab_start: int, v_local: int, group, device) -> int:
    """The global vocabulary size, after checking that the shards tile [0, V) without gaps."""
    mine = torch.tensor([vocab_start, v_local], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shards = sorted((int(s), int(n)) for s, n in every)
    end = 0
    for start, size in shards:
        if start != end:
            raise ValueError(f"bases shards must tile the vocabulary in order: a shard starts at {start}, "
                             f"expected {end} (vocab_start and shard sizes over the ranks: {shards})")
        end = start + size
    return end


def similarity_cross_entropy(hidden: Tensor, bases_shard: Tensor, targets: Tensor, *, vocab_start: int, group=None,
                             scale: float = 1.0, normalize: bool = True, ignore_index: int = -100,
                             reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-8,
                             impl: str = "auto") -> Tensor:
    """The loss of ``vocabsem_fast.similarity_cross_entropy`` over the bases concatenated across
    the ranks of ``group`` in rank order of ``vocab_start`` (see the module docstring)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocabsem_fast.distributed needs an initialised torch.distributed process group")
    call = check_cross_entropy_args(hidden, bases_shard, targets, scale=scale, normalize=normalize,
                                    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                    eps=eps)
    vocab_start = check_int(vocab_start, "vocab_start", low=0)
    scale, normalize, eps, ignore_index = call.scale, call.normalize, call.eps, call.ignore_index
    reduction, smoothing = call.reduction, call.label_smoothing

    h = _SumGradientsAcrossRanks.apply(hidden.reshape(-1, hidden.shape[-1]), group)
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    v_local = bases_shard.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    vocab = _check_shards(vocab_start, v_local, group, h.device)
    bad = valid & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {vocab}) (the vocabulary over all ranks) or equal ignore_index")
    mine = valid & (t >= vocab_start) & (t < vocab_start + v_local)
    local_t = torch.where(mine, t - vocab_start, 0)

    if v_local > 0:
        hn = _unit(h, normalize, eps)
        picked = scale * (hn * _unit(bases_shard[local_t], normalize, eps)).sum(-1)
        # the shard's log-sum-exp from the fused op (its loss is not used: "none" forms no gradients early)
        _, lse_local = _local_cross_entropy(h, bases_shard, local_t, scale=scale, normalize=normalize,
                                            reduction="none", eps=eps, impl=impl, return_lse=True)
        lse_local = lse_local.to(acc)
    else:  # an empty shard contributes nothing to any sum
        hn = None
        picked = h.new_zeros(h.shape[0], dtype=acc)
        lse_local = h.new_full((h.shape[0],), float("-inf"), dtype=acc)
    shift = lse_local.detach().clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    lse = shift + torch.log(_AllReduceSum.apply(torch.exp(lse_local - shift), group))
    target_logit = _AllReduceSum.apply(torch.where(mine, picked, 0.0), group)
    per_row = lse - (1.0 - smoothing) * target_logit
    if smoothing > 0:
        local_sum = (scale * hn @ _unit(bases_shard, normalize, eps).sum(0)) if v_local > 0 else picked * 0
        per_row = per_row - smoothing * _AllReduceSum.apply(local_sum, group) / vocab
    per_row = torch.where(valid, per_row, 0.0)
    if reduction == "none":
        return per_row.reshape(targets.shape)
    total = per_row.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1).to(total.dtype)
