"""Triton kernels for similarity logits against a vocabulary of bases, fused so that no N x V
tile ever leaves registers and shared memory (the strip epilogue excepted, see below).

Scores are ``scale * (h . b) * inv_h * inv_b``: the inverse row norms (computed once per tensor
by the caller) enter as a rank-1 scale in the epilogue, so neither a normalised copy of the
hidden states nor of the bases exists.

* ``cross_entropy_forward``: programs over (row block, vocabulary split): each walks its share
  of V in blocks with an online log-sum-exp, gathering the target logit (and the logit sum, for
  label smoothing); the splits' partial results merge exactly (max, rescaled sum). Splitting V
  keeps a whole GPU busy when there are few rows (decoding, scoring).
* ``topk``: the same grid, a running top-k per row and split; the splits' k best merge.
* ``strip_epilogue``: the cross-entropy gradients run the strip algorithm of the package
  (``vocabsem_fast.backends.strips``: three cuBLAS GEMMs on row strips) with this kernel in
  between: one program per strip row turns raw scores into loss, log-sum-exp and the gradient
  tile in place. It replaces a fused backward whose tiles added their products into the fp32
  gradients with atomics: V / BLOCK_V atomic adds per hidden-gradient element (2004 at
  V = 128256), unfiltered at similarity logits (0.1% of tiles skippable, measured).
* ``soft_assign``: batched softmax over K centroids for blocks of points, K in one tile.

Every launch geometry is a plain function (``*_grid``) of the sizes and the GPU's SM count, and
every compiled variant (kernel, signature, constexprs, launch options) is listed by
``variants()`` in ``vocabsem_fast.kernels.variants``. Offsets are int64, so N x V and V x d may
pass 2^31. Under ``TRITON_INTERPRET=1`` (CPU tests) every dot runs in fp32: the interpreter
computes bf16 dots on raw bit patterns.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..backends.strips import merge_topk
from ..gpu_geometry import balanced_splits, sm_count

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# One pinned configuration per kernel and row regime: few rows (decoding) take 16-row blocks,
# the smallest a tensor-core dot takes.
FORWARD = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=3)
FORWARD_FP32 = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)  # fp32 FMA: registers
FORWARD_FEW_ROWS = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=3)
TOPK = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
TOPK_FP32 = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2)  # fp32 FMA: registers
TOPK_FEW_ROWS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=64, num_warps=4, num_stages=2)
EPILOGUE = dict(BLOCK_V=1024, num_warps=4, num_stages=1)
ASSIGN = dict(BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=2)
# 128 centroids and more in one tile: eight warps share the (BLOCK_N, BLOCK_K) fp32 scores (four
# spill 8 bytes at 128 in bf16 / fp16 on sm_90; eight spill nowhere, scripts/check_gpu_kernels.py)
ASSIGN_WIDE = dict(BLOCK_N=32, BLOCK_D=32, num_warps=8, num_stages=2)
FEW_ROWS = 16  # at most this many rows: the *_FEW_ROWS configurations


@triton.jit
def _score_tile(h_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) raw dot products of a block of rows with a block of bases, fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_off = rows.to(tl.int64)[:, None] * stride_h
    col_off = cols.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(h_ptr + row_off + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(b_ptr + col_off + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(h, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scaled(acc, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, scale, NORMALIZE: tl.constexpr):
    if NORMALIZE:
        ih = tl.load(inv_h_ptr + rows, mask=row_mask, other=0.0)
        ib = tl.load(inv_b_ptr + cols, mask=col_mask, other=0.0)
        factor = (ih * scale)[:, None] * ib[None, :]
        # an inverse norm of 0 (the norm overflowed) makes the logit 0, as F.normalize does, even
        # where the raw product overflowed (0 x inf would be NaN)
        return tl.where(factor == 0, 0.0, acc * factor)
    return acc * scale


@triton.jit
def _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b, scale,
                NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 logits: the raw tile scaled by ``scale`` and the inverse norms."""
    acc = _score_tile(h_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                      BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    return _scaled(acc, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, scale, NORMALIZE)


@triton.jit
def _ce_forward_kernel(h_ptr, b_ptr, t_ptr, inv_h_ptr, inv_b_ptr, part_ptr,
                       N, V, D, stride_h, stride_b, scale, split_cols,
                       NORMALIZE: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial online log-sum-exp of rows [BLOCK_N block] over vocabulary split program_id(1):
    part (4, splits, N) <- running max, rescaled sum, target logit, logit sum."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_mask = rows < N
    v_start = split * split_cols
    v_end = tl.minimum(V, v_start + split_cols)
    target = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                        scale, NORMALIZE, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        if SMOOTH:
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        running_max = new_max
    out = split.to(tl.int64) * N + rows
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(part_ptr + out, running_max, mask=row_mask)
    tl.store(part_ptr + plane + out, running_sum, mask=row_mask)
    tl.store(part_ptr + 2 * plane + out, target_logit, mask=row_mask)
    tl.store(part_ptr + 3 * plane + out, logit_sum, mask=row_mask)


@triton.jit
def _topk_kernel(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, val_ptr, idx_ptr, N, V, D, stride_h, stride_b, scale,
                 split_cols, batch_stride_h, batch_stride_b, K,
                 K_PAD: tl.constexpr, NORMALIZE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The best K of rows [BLOCK_N block] of problem program_id(2) within vocabulary split
    program_id(1), unordered: val / idx (splits, problems, N, K); slots beyond the split's columns
    hold -inf / -1. Problems (a batch of independent hard assignments) are ``batch_stride_*``
    elements apart in h and b, N and V apart in the inverse norms."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    problem = tl.program_id(2).to(tl.int64)
    h_ptr += problem * batch_stride_h
    b_ptr += problem * batch_stride_b
    inv_h_ptr += problem * N
    inv_b_ptr += problem * V
    row_mask = rows < N
    v_start = split * split_cols
    v_end = tl.minimum(V, v_start + split_cols)
    slots = tl.arange(0, K_PAD)
    # the running best K of each row; padding slots hold +inf so they are never the minimum
    best = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, K_PAD), tl.float32)
    best_value = best  # what is stored: the keys, with NaN where a NaN was taken
    best_idx = tl.zeros((BLOCK_N, K_PAD), tl.int32) - 1  # int32 in registers: V < 2^31
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                        scale, NORMALIZE, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # NaN ranks above every number, as in torch.topk: selection runs on keys with NaN as +inf
        # and the NaN is put back in the value kept
        is_nan = z != z
        z = tl.where(is_nan, float("inf"), z)
        # at most K entries of this tile can enter: take the tile's best K one at a time, each
        # replacing the row's current worst when larger (ties keep the earlier, lower index)
        for _ in range(K):
            top = tl.max(z, axis=1)
            top_col = tl.min(tl.where(z == top[:, None], cols[None, :], V), axis=1)
            top_nan = tl.max(tl.where(is_nan & (cols[None, :] == top_col[:, None]), 1, 0), axis=1) > 0
            worst = tl.min(best, axis=1)
            worst_slot = tl.min(tl.where(best == worst[:, None], slots[None, :], K_PAD), axis=1)
            take = (top > worst) & (top_col < V)
            replace = take[:, None] & (slots[None, :] == worst_slot[:, None])
            best = tl.where(replace, top[:, None], best)
            best_value = tl.where(replace, tl.where(top_nan, float("nan"), top)[:, None], best_value)
            best_idx = tl.where(replace, top_col[:, None], best_idx)
            z = tl.where(cols[None, :] == top_col[:, None], float("-inf"), z)
    out = ((split.to(tl.int64) * tl.num_programs(2) + problem) * N + rows.to(tl.int64))[:, None] * K + slots[None, :]
    mask = row_mask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, best_value, mask=mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=mask)


@triton.jit
def _epilogue_logits(raw, row_scale, col_scale, COL_SCALE: tl.constexpr):
    """Raw strip scores times their row and column scales; a zero scale (an overflowed norm)
    gives 0 whatever the raw score, as in ``_scaled``."""
    z = tl.where(row_scale == 0, 0.0, raw * row_scale)
    if COL_SCALE:
        z = tl.where(col_scale == 0, 0.0, z * col_scale)
    return z


@triton.jit
def _strip_epilogue_kernel(s_ptr, ld, row_scale_ptr, col_scale_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr,
                           V, ignore_index, smoothing,
                           COL_SCALE: tl.constexpr, SMOOTH: tl.constexpr, GRAD: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    """One row of an fp32 strip of raw scores: logits ``s * row_scale * col_scale``; loss and
    log-sum-exp; with GRAD, the row becomes ``w * (softmax - (1 - ls) onehot - ls / V) * col_scale``."""
    row = tl.program_id(0)
    base = s_ptr + row.to(tl.int64) * ld
    rs = tl.load(row_scale_ptr + row)
    target = tl.load(t_ptr + row)
    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    lane_target = tl.zeros((BLOCK_V,), tl.float32)
    lane_logits = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        col_scale = 1.0
        if COL_SCALE:
            col_scale = tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
        z = _epilogue_logits(tl.load(base + cols, mask=mask, other=0.0), rs, col_scale, COL_SCALE)
        lane_target += tl.where(cols == target, z, 0.0)
        if SMOOTH:
            lane_logits += tl.where(mask, z, 0.0)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(lane_max, z)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(z - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    lse = shift + tl.log(tl.sum(lane_sum * tl.exp(lane_max - shift), axis=0))
    loss = lse - (1.0 - smoothing) * tl.sum(lane_target, axis=0)
    if SMOOTH:
        loss -= smoothing * tl.sum(lane_logits, axis=0) / V
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(target == ignore_index, 0.0, loss))
    if GRAD:
        w = tl.load(w_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            col_scale = 1.0
            if COL_SCALE:
                col_scale = tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
            z = _epilogue_logits(tl.load(base + cols, mask=mask, other=0.0), rs, col_scale, COL_SCALE)
            g = tl.exp(z - lse) - smoothing / V
            g -= tl.where(cols == target, 1.0 - smoothing, 0.0)
            g = tl.where(w == 0.0, 0.0, g * w * col_scale)  # a zero weight (ignored row) gives zeros, NaN or not
            tl.store(base + cols, g, mask=mask)


@triton.jit
def _soft_assign_kernel(p_ptr, c_ptr, inv_p_ptr, inv_c_ptr, out_ptr, N, K, D, scale,
                        NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    col_mask = cols < K
    p_base = p_ptr + batch.to(tl.int64) * N * D
    c_base = c_ptr + batch.to(tl.int64) * K * D
    z = _logit_tile(p_base, c_base, inv_p_ptr + batch.to(tl.int64) * N, inv_c_ptr + batch.to(tl.int64) * K,
                    rows, cols, row_mask, col_mask, D, D, D, scale, NORMALIZE, BLOCK_N, BLOCK_K, BLOCK_D, UPCAST,
                    PRECISION)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    z = tl.exp(z - tl.max(z, axis=1)[:, None])
    probs = z / tl.sum(z, axis=1)[:, None]
    out = out_ptr + batch.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(out, probs, mask=row_mask[:, None] & col_mask[None, :])


# --- geometry: plain functions of the sizes, checked on the CPU -----------------------------------

def forward_config(n: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    if n <= FEW_ROWS:
        return FORWARD_FEW_ROWS
    return FORWARD_FP32 if dtype == torch.float32 else FORWARD


def topk_config(n: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    if dtype == torch.float32:
        return TOPK_FP32
    return TOPK_FEW_ROWS if n <= FEW_ROWS else TOPK


def split_grid(n: int, v: int, block_n: int, block_v: int, sms: int) -> tuple[tuple[int, int], int]:
    """((row blocks, vocabulary splits), columns per split) for a kernel over (row block, split).

    Few row blocks split the vocabulary, each split a whole number of BLOCK_V columns, as many
    splits as finish soonest on ``sms`` SMs (``gpu_geometry.balanced_splits``: one wave, not a
    second one for a few programs). With many rows (training shapes) one split per row block
    already fills the GPU."""
    row_blocks = max(1, triton.cdiv(n, block_n))
    v_blocks = max(1, triton.cdiv(v, block_v))
    splits = balanced_splits(row_blocks, v_blocks, sms)
    split_cols = triton.cdiv(v_blocks, splits) * block_v
    return (row_blocks, triton.cdiv(v, split_cols)), split_cols


# CUDA allows 2^31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2: a launch with more
# problems on those axes fails. Batched launches go in chunks of at most this many problems.
MAX_GRID_YZ = 65535


def batch_chunks(batch: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(batch)`` in chunks of at most ``limit``
    (default ``MAX_GRID_YZ``)."""
    limit = limit or MAX_GRID_YZ
    return [(start, min(batch, start + limit)) for start in range(0, batch, limit)]


def on_device(tensor: torch.Tensor):
    """Launch under the tensors' GPU, not the current one: Triton launches on the current device,
    and a model spread over GPUs (``device_map="auto"``) keeps its head on another."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def epilogue_grid(rows: int) -> tuple[int]:
    return (rows,)


def soft_assign_config(k: int) -> dict:
    return ASSIGN_WIDE if soft_assign_block_k(k) >= 128 else ASSIGN


def soft_assign_grid(batch: int, n: int, k: int = 1) -> tuple[int, int]:
    return (triton.cdiv(n, soft_assign_config(k)["BLOCK_N"]), batch)


# --- launchers -----------------------------------------------------------------------------------

# fp32 dots run in full fp32 ("ieee"), not TF32: the contract is fp32 accuracy for fp32 inputs.
FP32_PRECISION = "ieee"


def _inverse_or_dummy(inv, like):
    return inv if inv is not None else like.new_empty(1, dtype=torch.float32)


# The constexprs each launcher selects, as functions of its inputs: the launchers and the
# ahead-of-time variant list (``variants.py``) use the same ones. ``interpreting``: every dot in
# fp32 (the interpreter's bf16 dots are wrong); a GPU keeps bf16 / fp16 operands on tensor cores.
def forward_constexprs(dtype: torch.dtype, normalize: bool, smooth: bool, *, interpreting: bool = INTERPRETING) -> dict:
    return dict(NORMALIZE=normalize, SMOOTH=smooth, UPCAST=interpreting or dtype == torch.float32,
                PRECISION=FP32_PRECISION)


def topk_constexprs(dtype: torch.dtype, normalize: bool, k: int, *, interpreting: bool = INTERPRETING) -> dict:
    # k itself is a run-time argument: one compiled variant per power-of-two K_PAD serves every k
    # up to it (seven variants for k <= 64, not 64)
    return dict(K_PAD=triton.next_power_of_2(k), NORMALIZE=normalize,
                UPCAST=interpreting or dtype == torch.float32, PRECISION=FP32_PRECISION)


def soft_assign_constexprs(dtype: torch.dtype, normalize: bool, k: int, *,
                           interpreting: bool = INTERPRETING) -> dict:
    return dict(NORMALIZE=normalize, UPCAST=interpreting or dtype == torch.float32, PRECISION=FP32_PRECISION,
                BLOCK_K=soft_assign_block_k(k))


def epilogue_constexprs(col_scale: bool, smooth: bool, grad: bool) -> dict:
    return dict(COL_SCALE=col_scale, SMOOTH=smooth, GRAD=grad)


def cross_entropy_forward(hidden, bases, targets, inv_h, inv_b, scale: float, ignore_index: int,
                          smoothing: float):
    """Per-row loss (0 for ignored rows) and log-sum-exp, both fp32."""
    n, d = hidden.shape
    v = bases.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n == 0:
        return torch.empty(0, **f32), torch.empty(0, **f32)
    config = forward_config(n, hidden.dtype)
    grid, split_cols = split_grid(n, v, config["BLOCK_N"], config["BLOCK_V"], sm_count(hidden.device))
    part = torch.empty(4, grid[1], n, **f32)
    with on_device(hidden):
        _ce_forward_kernel[grid](
            hidden, bases, targets, _inverse_or_dummy(inv_h, hidden), _inverse_or_dummy(inv_b, hidden), part,
            n, v, d, hidden.stride(0), bases.stride(0), float(scale), split_cols,
            **forward_constexprs(hidden.dtype, inv_h is not None, smoothing > 0), **config)
    split_max, split_sum, split_target, split_logits = part.unbind(0)
    row_max = split_max.amax(0)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # all -inf: a finite shift
    lse = shift + torch.log((split_sum * torch.exp(split_max - shift)).sum(0))
    loss = lse - (1.0 - smoothing) * split_target.sum(0)
    if smoothing > 0:
        loss = loss - smoothing * split_logits.sum(0) / v
    return torch.where(targets == ignore_index, 0.0, loss), lse


def topk(hidden, bases, inv_h, inv_b, scale: float, k: int):
    """Top-k scores (fp32, descending) and their int64 indices per row."""
    values, indices = batched_topk(hidden[None], bases[None], None if inv_h is None else inv_h[None],
                                   None if inv_b is None else inv_b[None], scale, k)
    return values[0], indices[0]


def batched_topk(points, centroids, inv_p, inv_c, scale: float, k: int):
    """(B, N, d) against (B, V, d), each problem on its own, in one launch per ``MAX_GRID_YZ``
    problems: (B, N, k) values and indices. Inverse norms are (B, N) and (B, V) (or None)."""
    batch, n, _ = points.shape
    if batch == 0 or n == 0:
        return (torch.empty(batch, n, k, dtype=torch.float32, device=points.device),
                torch.empty(batch, n, k, dtype=torch.int64, device=points.device))
    parts = [_batched_topk_launch(points[a:b], centroids[a:b], None if inv_p is None else inv_p[a:b],
                                  None if inv_c is None else inv_c[a:b], scale, k) for a, b in batch_chunks(batch)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _batched_topk_launch(points, centroids, inv_p, inv_c, scale: float, k: int):
    batch, n, d = points.shape
    v = centroids.shape[1]
    config = topk_config(n, points.dtype)
    (row_blocks, splits), split_cols = split_grid(n, v, config["BLOCK_N"], config["BLOCK_V"],
                                                  -(-sm_count(points.device) // batch))
    values = torch.empty(splits, batch, n, k, dtype=torch.float32, device=points.device)
    indices = torch.empty(splits, batch, n, k, dtype=torch.int64, device=points.device)
    with on_device(points):
        _topk_kernel[(row_blocks, splits, batch)](
            points, centroids, _inverse_or_dummy(inv_p, points), _inverse_or_dummy(inv_c, points), values, indices,
            n, v, d, points.stride(1), centroids.stride(1), float(scale), split_cols, points.stride(0),
            centroids.stride(0), k, **topk_constexprs(points.dtype, inv_p is not None, k), **config)
    # merge the splits: each row's k best of splits x k candidates (slots are unordered)
    values = values.permute(1, 2, 0, 3).reshape(batch * n, -1)
    indices = indices.permute(1, 2, 0, 3).reshape(batch * n, -1)
    best, where = merge_topk(values, indices, k)
    return best.view(batch, n, k), where.view(batch, n, k)


def strip_epilogue(scores, row_scale, col_scale, targets, ignore_index: int, weight, smoothing: float):
    """In place on an fp32 strip (R, V) of raw scores: per-row (loss, lse); with ``weight`` the
    strip becomes the gradient tile (see ``_strip_epilogue_kernel``)."""
    rows, v = scores.shape
    loss = torch.empty(rows, dtype=torch.float32, device=scores.device)
    lse = torch.empty(rows, dtype=torch.float32, device=scores.device)
    if rows == 0:
        return loss, lse
    dummy = scores.new_empty(1)
    with on_device(scores):
        _strip_epilogue_kernel[epilogue_grid(rows)](
            scores, scores.stride(0), row_scale.to(torch.float32).contiguous(),
            dummy if col_scale is None else col_scale, targets.contiguous(),
            dummy if weight is None else weight.to(torch.float32).contiguous(), loss, lse, v, int(ignore_index),
            float(smoothing), **epilogue_constexprs(col_scale is not None, smoothing > 0, weight is not None),
            **EPILOGUE)
    return loss, lse


def soft_assign(points, centroids, inv_p, inv_c, scale: float):
    """(B, N, K) softmax over K of the scaled similarities, fp32; K must fit one tile."""
    batch, n, d = points.shape
    k = centroids.shape[1]
    out = torch.empty(batch, n, k, dtype=torch.float32, device=points.device)
    if batch == 0 or n == 0:
        return out
    # inverse norms arrive flattened, (B * N) and (B * K): sliced per chunk as (B, N) and (B, K)
    inv_p = None if inv_p is None else inv_p.view(batch, n)
    inv_c = None if inv_c is None else inv_c.view(batch, k)
    with on_device(points):
        for a, b in batch_chunks(batch):  # the batch is grid axis 1
            _soft_assign_kernel[soft_assign_grid(b - a, n, k)](
                points[a:b], centroids[a:b], _inverse_or_dummy(None if inv_p is None else inv_p[a:b], points),
                _inverse_or_dummy(None if inv_c is None else inv_c[a:b], points), out[a:b], n, k, d, float(scale),
                **soft_assign_constexprs(points.dtype, inv_p is not None, k), **soft_assign_config(k))
    return out


def soft_assign_block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


MAX_TOPK = 64  # the top-k takes a tile's best K one at a time (K passes over the tile): small K only
MAX_SOFT_ASSIGN_K = 256  # beyond this a (BLOCK_N, K) fp32 tile no longer fits in registers
