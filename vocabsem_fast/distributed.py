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

import contextlib
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_int, debug_checks_enabled
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


# What every rank states before any collective that could hang on a disagreement: whether its
# arguments passed the local checks, its shard, and the options and sizes that must be equal
# everywhere (float64 holds each exactly); the debug check adds fingerprints of the data.
_AGREED = ("N", "d", "dtype", "scale", "normalize", "ignore_index", "reduction", "label_smoothing", "eps")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_FINGERPRINTS = ("hidden", "targets")


def _status_device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")


def _fingerprint(x: Tensor) -> list[float]:
    """Two position-weighted sums in float64: equal inputs give equal bits on every rank."""
    flat = x.detach().reshape(-1).to(torch.float64)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973)
    return [float(flat.sum()), float((flat * weights).sum())]


def _statement(hidden, bases_shard, targets, call, vocab_start: int, consistency: bool) -> list[float]:
    n = targets.numel()
    facts = [0.0, vocab_start, bases_shard.shape[0], n, hidden.shape[-1], _DTYPES.index(hidden.dtype),
             call.scale, float(call.normalize), call.ignore_index, _REDUCTIONS.index(call.reduction),
             call.label_smoothing, call.eps]
    facts.append(float(consistency))
    facts += _fingerprint(hidden) + _fingerprint(targets) if consistency else [0.0] * 4
    return facts


_WIDTH = 3 + len(_AGREED) + 1 + 2 * len(_FINGERPRINTS)  # the same on every rank, whatever its settings


def _agree(statement: list[float] | None, group) -> int:
    """All-gathers every rank's statement; raises on every rank alike when one rank's arguments
    failed or the ranks disagree, so that no rank is left waiting in a collective. Returns the
    vocabulary size over all ranks."""
    mine = torch.tensor(statement if statement is not None else [1.0] + [0.0] * (_WIDTH - 1), dtype=torch.float64,
                        device=_status_device(group))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [row.tolist() for row in every]
    failed = [rank for rank, row in enumerate(rows) if row[0] != 0]
    if failed:
        raise ValueError(f"rank(s) {failed} rejected their arguments (their own error says why); every rank stops")
    for i, name in enumerate(_AGREED, start=3):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = [_DTYPES[int(v)] for v in values] if name == "dtype" else \
                [_REDUCTIONS[int(v)] for v in values] if name == "reduction" else values
            raise ValueError(f"the ranks disagree on {name}: {shown} (rank by rank); it must be the same everywhere")
    checked = all(row[12] for row in rows)  # every rank asked for the consistency check
    for j, name in enumerate(_FINGERPRINTS):
        if checked and len({tuple(row[13 + 2 * j:15 + 2 * j]) for row in rows}) > 1:
            raise ValueError(f"the ranks hold different {name} (consistency check): every rank must pass the same "
                             f"{name}")
    shards = sorted((int(row[1]), int(row[2])) for row in rows)
    end = 0
    for start, size in shards:
        if start != end:
            raise ValueError(f"bases shards must tile the vocabulary in order: a shard starts at {start}, "
                             f"expected {end} (vocab_start and shard sizes over the ranks: {shards})")
        end = start + size
    if end == 0:
        raise ValueError("bases shards are all empty: the vocabulary must have at least one row")
    return end


def similarity_cross_entropy(hidden: Tensor, bases_shard: Tensor, targets: Tensor, *, vocab_start: int, group=None,
                             scale: float = 1.0, normalize: bool = True, ignore_index: int = -100,
                             reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-8,
                             impl: str = "auto", check_consistency: bool | None = None) -> Tensor:
    """The loss of ``vocabsem_fast.similarity_cross_entropy`` over the bases concatenated across
    the ranks of ``group`` in rank order of ``vocab_start`` (see the module docstring).

    A shard may be empty (V smaller than the world size). Before any other collective the ranks
    exchange what they were given: a rank whose arguments fail its checks, shards that overlap
    or leave gaps, and ranks that disagree on N, d, dtype or an option make every rank raise at
    once. ``check_consistency`` (default: on when ``VOCABSEM_DEBUG=1``) also compares
    fingerprints of ``hidden`` and ``targets`` (a pass over each: cheap against the loss)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocabsem_fast.distributed needs an initialised torch.distributed process group")
    consistency = debug_checks_enabled() if check_consistency is None else bool(check_consistency)
    try:
        call = check_cross_entropy_args(hidden, bases_shard, targets, scale=scale, normalize=normalize,
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, eps=eps, allow_empty_bases=True)
        vocab_start = check_int(vocab_start, "vocab_start", low=0)
        statement = _statement(hidden, bases_shard, targets, call, vocab_start, consistency)
    except (TypeError, ValueError):
        with contextlib.suppress(ValueError):
            _agree(None, group)  # the others learn that this rank stops; it raises its own error
        raise
    vocab = _agree(statement, group)
    scale, normalize, eps, ignore_index = call.scale, call.normalize, call.eps, call.ignore_index
    reduction, smoothing = call.reduction, call.label_smoothing

    h = _SumGradientsAcrossRanks.apply(hidden.reshape(-1, hidden.shape[-1]), group)
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    v_local = bases_shard.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    bad = (valid & ((t < 0) | (t >= vocab))).any().to(torch.float64).reshape(1).to(_status_device(group))
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)  # one rank's bad targets stop them all
    if bool(bad):
        raise ValueError(f"targets must lie in [0, {vocab}) (the vocabulary over all ranks) or equal ignore_index "
                         "(on at least one rank)")
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
        # zero, but on h's graph: the backward all-reduce of the hidden gradient must run on
        # this rank too, or the others wait for it (and the empty shard gets an empty gradient)
        picked = (h * 0).sum(-1).to(acc) + bases_shard.sum().to(acc) * 0
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


def run_on_local_group(fn, world: int, *args, timeout: float | None = None) -> None:
    """Runs ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo process
    group on this machine (``fn`` must be importable: a module-level function), and returns when
    every process has finished; an exception in one process is raised here. ``timeout`` (seconds)
    bounds each collective's wait (default: torch's, 30 minutes).

    Each process ends with ``os._exit(0)`` once ``fn`` returned and the group is torn down:
    gloo's threads can abort an exiting interpreter ("terminate called without an active
    exception", about one process in thirty in torch 2.13, after all work was done), which would
    turn a finished run into a failure."""
    import torch.multiprocessing as mp

    world = check_int(world, "world", low=1)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_local_group_process, args=(world, os.path.join(folder, "init"), fn, args, timeout), nprocs=world,
                 join=True)


def _local_group_process(rank: int, world: int, init_file: str, fn, args, timeout: float | None) -> None:
    options = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **options)
    try:
        fn(rank, world, *args)
    finally:
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
