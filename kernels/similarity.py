"""Triton kernels for similarity logits against a vocabulary of bases, fused so that no N x V
tile ever leaves registers and shared memory.

Scores are ``scale * (h . b) * inv_h * inv_b``: the inverse row norms (computed once per tensor
by the caller) enter as a rank-1 scale in the epilogue, so neither a normalised copy of the
hidden states nor of the bases exists. Gradients are returned with respect to the *normalised*
rows; the caller applies the exact gradient of the normalisation (O(N d + V d)).

* ``cross_entropy_forward``: one program per block of rows walks V in blocks with an online
  log-sum-exp, gathering the target logit (and the logit sum, for label smoothing) on the way.
* ``cross_entropy_backward``: one program per (row block, V block) tile recomputes the scores,
  forms ``upstream * (softmax - (1 - ls) onehot - ls / V)`` and adds its two products into fp32
  gradient buffers with atomics. Tiles whose largest |softmax - target| is below ``filter_eps``
  may be skipped (off by default: exact).
* ``topk``: one program per block of rows keeps a running top-k across V blocks.
* ``soft_assign``: batched softmax over K centroids for blocks of points, K in one tile.

Offsets are int64, so N x V and V x d may pass 2^31. Under ``TRITON_INTERPRET=1`` (CPU tests)
every dot runs in fp32: the interpreter computes bf16 dots on raw bit patterns.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# One pinned configuration per kernel (autotuning is opt-in, see ``autotuned``).
FORWARD = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=3)
BACKWARD = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2)
TOPK = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2)
ASSIGN = dict(BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=2)


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
        return acc * (ih * scale)[:, None] * ib[None, :]
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
def _ce_forward_kernel(h_ptr, b_ptr, t_ptr, inv_h_ptr, inv_b_ptr, loss_ptr, lse_ptr,
                       N, V, D, stride_h, stride_b, scale, ignore_index, smoothing,
                       NORMALIZE: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                        scale, NORMALIZE, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        if SMOOTH:
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    loss = lse - (1.0 - smoothing) * target_logit
    if SMOOTH:
        loss -= smoothing * logit_sum / V
    loss = tl.where(target == ignore_index, 0.0, loss)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, loss, mask=row_mask)


@triton.jit
def _ce_backward_kernel(h_ptr, b_ptr, t_ptr, inv_h_ptr, inv_b_ptr, lse_ptr, w_ptr, dh_ptr, db_ptr,
                        N, V, D, stride_h, stride_b, scale, ignore_index, smoothing, filter_eps,
                        NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        NEED_H: tl.constexpr,
                        NEED_B: tl.constexpr, FILTER: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    target = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    upstream = tl.load(w_ptr + rows, mask=row_mask, other=0.0)  # zero for ignored rows
    z = _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                    scale, NORMALIZE, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
    g = tl.exp(z - lse[:, None]) - smoothing / V
    g -= tl.where(cols[None, :] == target[:, None], 1.0 - smoothing, 0.0)
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    # gradient filtering (as CCE does): skip the products of a tile whose every
    # |softmax - target| is below filter_eps, before the upstream scale
    d_end = D
    if FILTER:
        if tl.max(tl.abs(g)) < filter_eps:
            d_end = 0
    g = g * (upstream * scale)[:, None]
    # d(score)/d(normalised h) = scale * normalised b: fold each side's inverse norm into g
    if NORMALIZE:
        ih = tl.load(inv_h_ptr + rows, mask=row_mask, other=0.0)
        ib = tl.load(inv_b_ptr + cols, mask=col_mask, other=0.0)
        g_h = g * ib[None, :]
        g_b = g * ih[:, None]
    else:
        g_h = g
        g_b = g
    row_off = rows.to(tl.int64)[:, None] * stride_h
    col_off = cols.to(tl.int64)[:, None] * stride_b
    out_row = rows.to(tl.int64)[:, None] * D
    out_col = cols.to(tl.int64)[:, None] * D
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        if NEED_H:
            b = tl.load(b_ptr + col_off + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                part = tl.dot(g_h, b.to(tl.float32), input_precision=PRECISION)
            else:
                part = tl.dot(g_h.to(b.dtype), b)
            tl.atomic_add(dh_ptr + out_row + dd[None, :], part, mask=row_mask[:, None] & d_mask[None, :])
        if NEED_B:
            h = tl.load(h_ptr + row_off + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                part = tl.dot(tl.trans(g_b), h.to(tl.float32), input_precision=PRECISION)
            else:
                part = tl.dot(tl.trans(g_b.to(h.dtype)), h)
            tl.atomic_add(db_ptr + out_col + dd[None, :], part, mask=col_mask[:, None] & d_mask[None, :])


@triton.jit
def _topk_kernel(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, val_ptr, idx_ptr, N, V, D, stride_h, stride_b, scale,
                 K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    slots = tl.arange(0, K_PAD)
    # the running best K of each row; padding slots hold +inf so they are never the minimum
    best = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, K_PAD), tl.float32)
    best_idx = tl.zeros((BLOCK_N, K_PAD), tl.int64) - 1
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, b_ptr, inv_h_ptr, inv_b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_b,
                        scale, NORMALIZE, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # at most K entries of this tile can enter: take the tile's best K one at a time, each
        # replacing the row's current worst when larger (ties keep the earlier, lower index)
        for _ in tl.static_range(K):
            top = tl.max(z, axis=1)
            top_col = tl.min(tl.where(z == top[:, None], cols[None, :], V), axis=1)
            worst = tl.min(best, axis=1)
            worst_slot = tl.min(tl.where(best == worst[:, None], slots[None, :], K_PAD), axis=1)
            take = (top > worst) & (top_col < V)
            replace = take[:, None] & (slots[None, :] == worst_slot[:, None])
            best = tl.where(replace, top[:, None], best)
            best_idx = tl.where(replace, top_col.to(tl.int64)[:, None], best_idx)
            z = tl.where(cols[None, :] == top_col[:, None], float("-inf"), z)
    out = rows.to(tl.int64)[:, None] * K + slots[None, :]
    mask = row_mask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + out, best, mask=mask)
    tl.store(idx_ptr + out, best_idx, mask=mask)


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


# --- launchers -----------------------------------------------------------------------------------

def _upcast(x: torch.Tensor) -> bool:
    return INTERPRETING or x.dtype == torch.float32


# fp32 dots run in full fp32 ("ieee"), not TF32: the contract is fp32 accuracy for fp32 inputs.
FP32_PRECISION = "ieee"


# Opt-in autotuning (VOCABSEM_TRITON_AUTOTUNE=1): each call shape (N, V, D) is timed over the
# configurations below once per process. Off by default: the pinned configurations above are
# deterministic and cost no tuning time. The interpreter cannot autotune.
AUTOTUNE = os.environ.get("VOCABSEM_TRITON_AUTOTUNE", "0") == "1" and not INTERPRETING
TUNING_SPACE = [  # BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 4), (256, 64, 32, 8, 3),
]
_TUNED: dict = {}


def _launch(kernel, pinned: dict, grid_of, args: tuple, constexprs: dict, reset_to_zero=None) -> None:
    """Launch ``kernel`` with its pinned configuration, or through triton.autotune when opted in
    (``reset_to_zero`` names the accumulated outputs a tuning run must clear)."""
    if not AUTOTUNE:
        kernel[grid_of(pinned)](*args, **constexprs, **pinned)
        return
    tuned = _TUNED.get(kernel)
    if tuned is None:
        configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd), num_warps=w, num_stages=st)
                   for bn, bv, bd, w, st in TUNING_SPACE]
        tuned = _TUNED[kernel] = triton.autotune(configs=configs, key=["N", "V", "D"],
                                                 reset_to_zero=reset_to_zero)(kernel)
    tuned[grid_of](*args, **constexprs)


def _inverse_or_dummy(inv, like):
    return inv if inv is not None else like.new_empty(1, dtype=torch.float32)


def cross_entropy_forward(hidden, bases, targets, inv_h, inv_b, scale: float, ignore_index: int,
                          smoothing: float):
    """Per-row loss (0 for ignored rows) and log-sum-exp, both fp32."""
    n, d = hidden.shape
    v = bases.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return loss, lse
    _launch(_ce_forward_kernel, FORWARD, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
            (hidden, bases, targets, _inverse_or_dummy(inv_h, hidden), _inverse_or_dummy(inv_b, hidden), loss, lse,
             n, v, d, hidden.stride(0), bases.stride(0), float(scale), int(ignore_index), float(smoothing)),
            dict(NORMALIZE=inv_h is not None, SMOOTH=smoothing > 0, UPCAST=_upcast(hidden),
                 PRECISION=FP32_PRECISION))
    return loss, lse


def cross_entropy_backward(hidden, bases, targets, inv_h, inv_b, lse, upstream, scale: float, ignore_index: int,
                           smoothing: float, need_hidden: bool, need_bases: bool, filter_eps: float = 0.0):
    """fp32 gradients with respect to the normalised hidden rows and bases (None where not needed)."""
    n, d = hidden.shape
    v = bases.shape[0]
    dh = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_hidden else None
    db = torch.zeros(v, d, dtype=torch.float32, device=hidden.device) if need_bases else None
    if n == 0 or not (need_hidden or need_bases):
        return dh, db
    dummy = hidden.new_empty(1, dtype=torch.float32)
    _launch(_ce_backward_kernel, BACKWARD,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"])),
            (hidden, bases, targets, _inverse_or_dummy(inv_h, hidden), _inverse_or_dummy(inv_b, hidden), lse,
             upstream.to(torch.float32).contiguous(), dh if need_hidden else dummy, db if need_bases else dummy,
             n, v, d, hidden.stride(0), bases.stride(0), float(scale), int(ignore_index), float(smoothing),
             float(filter_eps)),
            dict(NORMALIZE=inv_h is not None, UPCAST=_upcast(hidden), PRECISION=FP32_PRECISION, NEED_H=need_hidden,
                 NEED_B=need_bases, FILTER=filter_eps > 0),
            reset_to_zero=["dh_ptr", "db_ptr"])
    return dh, db


def topk(hidden, bases, inv_h, inv_b, scale: float, k: int):
    """Top-k scores (fp32, descending) and their int64 indices per row."""
    n, d = hidden.shape
    v = bases.shape[0]
    values = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    if n == 0:
        return values, indices
    _launch(_topk_kernel, TOPK, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
            (hidden, bases, _inverse_or_dummy(inv_h, hidden), _inverse_or_dummy(inv_b, hidden), values, indices,
             n, v, d, hidden.stride(0), bases.stride(0), float(scale)),
            dict(K=k, K_PAD=triton.next_power_of_2(k), NORMALIZE=inv_h is not None, UPCAST=_upcast(hidden),
                 PRECISION=FP32_PRECISION))
    order = values.argsort(dim=1, descending=True, stable=True)  # slots are unordered: sort the k
    return values.gather(1, order), indices.gather(1, order)


def soft_assign(points, centroids, inv_p, inv_c, scale: float):
    """(B, N, K) softmax over K of the scaled similarities, fp32; K must fit one tile."""
    batch, n, d = points.shape
    k = centroids.shape[1]
    out = torch.empty(batch, n, k, dtype=torch.float32, device=points.device)
    if batch == 0 or n == 0:
        return out
    cfg = ASSIGN
    _soft_assign_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), batch)](
        points, centroids, _inverse_or_dummy(inv_p, points), _inverse_or_dummy(inv_c, points), out, n, k, d,
        float(scale), NORMALIZE=inv_p is not None, UPCAST=_upcast(points), PRECISION=FP32_PRECISION,
        BLOCK_K=max(16, triton.next_power_of_2(k)), **cfg)
    return out


MAX_TOPK = 64  # the top-k takes a tile's best K one at a time (K passes over the tile): small K only
MAX_SOFT_ASSIGN_K = 256  # beyond this a (BLOCK_N, K) fp32 tile no longer fits in registers
