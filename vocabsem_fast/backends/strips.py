"""The strip algorithm of the fused cross-entropy, shared by the cpu and cuda backends.

Rows are processed in strips of R rows against the whole vocabulary, three GEMMs in all:

1. ``S = hidden[strip] @ bases.T`` on the raw inputs (fp32 accumulation);
2. the device's epilogue folds in the scales (``scale / |h_r|`` per row, ``1 / |b_c|`` per
   column), gives each row's loss and log-sum-exp and, when gradients are wanted, turns ``S`` in
   place into the tile ``G = scale * w_r * (softmax - target) / |b_c|``;
3. ``G @ bases`` is the gradient w.r.t. the strip's normalised hidden rows, and
   ``G.T @ (hidden[strip] / |h|)`` accumulates ``|b|^-1`` times the gradient w.r.t. the
   normalised bases; the normalisation backward then runs once on each accumulated gradient.

Inverse norms enter as scales, so no normalised copy of the bases exists; the strip (at most
``strip_elements`` scores, but at least d/2 rows when the bases' gradient is wanted, so a large
head's (V, d) gradient is swept only a few times) is the only workspace beyond the gradients.

What differs between devices (the GEMMs, the epilogue, the norm kernels) is a ``StripKernels``
object; the orchestration below is the same for both.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
from torch import Tensor

from ..options import LossOptions, SimilarityOptions, accumulate_dtype
from .normalization import inverse_norms, normalization_backward


class StripKernels(Protocol):
    """The device-specific pieces of the strip algorithm."""

    def inverse_norms(self, x: Tensor, eps: float) -> Tensor:
        """1 / max(|row|, eps) in the accumulation dtype."""

    def scores(self, rows: Tensor, bases: Tensor, out: Tensor) -> None:
        """out (R, V) <- rows @ bases.T, accumulated in out's dtype."""

    def epilogue(self, scores: Tensor, row_scale: Tensor, col_scale: Tensor | None, targets: Tensor,
                 ignore_index: int, weight: Tensor | None, smoothing: float) -> tuple[Tensor, Tensor]:
        """Per-row (loss, lse) of logits ``scores * row_scale[r] * col_scale[c]`` (loss 0 where
        ignored); with ``weight``, scores <- the gradient tile, in place."""

    def gradient_products(self, tile: Tensor, bases: Tensor, rows: Tensor, grad_rows: Tensor | None,
                          grad_bases: Tensor | None, first: bool) -> None:
        """grad_rows (R, d) <- tile @ bases; grad_bases (V, d) <- tile.T @ rows on the first strip,
        += it on the others (either may be None: not wanted). ``rows`` in the inputs' dtype."""

    def normalization_backward(self, x: Tensor, inv: Tensor, grad: Tensor, eps: float,
                               grad_times_inv: bool) -> Tensor:
        """Gradient w.r.t. the raw rows of ``x * inv`` (see ``normalization.normalization_backward``)."""


def strip_rows(n: int, v: int, d: int, strip_elements: int, need_bases: bool) -> int:
    """Rows per strip: ``strip_elements`` scores, but at least d/2 rows when the bases' gradient
    is accumulated (each strip sweeps that (V, d) gradient once)."""
    wanted = max(strip_elements // max(v, 1), d // 2 if need_bases else 1)
    return max(1, min(max(n, 1), wanted))


def strip_cross_entropy(kernels: StripKernels, hidden: Tensor, bases: Tensor, targets: Tensor,
                        sim: SimilarityOptions, loss: LossOptions, weight: Tensor | None, need_hidden: bool,
                        need_bases: bool, strip_elements: int):
    """Per-row loss and lse and, with ``weight`` (N,), the gradients of ``sum_i weight_i * loss_i``
    w.r.t. ``hidden`` (N, d) and ``bases`` (V, d) (None where not asked for)."""
    acc = accumulate_dtype(hidden.dtype)
    n, d, v = hidden.shape[0], hidden.shape[1], bases.shape[0]
    need_grad = weight is not None and (need_hidden or need_bases)
    need_hidden, need_bases = need_grad and need_hidden, need_grad and need_bases
    f = dict(dtype=acc, device=hidden.device)
    inv_h = kernels.inverse_norms(hidden, sim.eps) if sim.normalize else None
    inv_b = kernels.inverse_norms(bases, sim.eps) if sim.normalize else None
    row_scale = inv_h * sim.scale if inv_h is not None else torch.full((n,), sim.scale, **f)
    tile_weight = weight.to(acc) * sim.scale if need_grad else None  # the scale of d z / d(normalised rows)

    per_row, lse = torch.empty(n, **f), torch.empty(n, **f)
    grad_h = torch.empty(n, d, **f) if need_hidden else None
    grad_b = torch.empty(v, d, **f) if need_bases else None  # the first strip writes, the others add
    rows_per_strip = strip_rows(n, v, d, strip_elements, need_bases)
    buffer = torch.empty(rows_per_strip, v, **f)
    for r0 in range(0, n, rows_per_strip):
        r1 = min(n, r0 + rows_per_strip)
        tile = buffer[: r1 - r0]
        kernels.scores(hidden[r0:r1], bases, tile)
        per_row[r0:r1], lse[r0:r1] = kernels.epilogue(
            tile, row_scale[r0:r1], inv_b, targets[r0:r1], loss.ignore_index,
            tile_weight[r0:r1] if need_grad else None, loss.label_smoothing)
        if need_grad:
            rows = hidden[r0:r1]
            if need_bases and inv_h is not None:  # the strip's normalised rows, in the inputs' dtype
                rows = (rows.to(acc) * inv_h[r0:r1, None]).to(hidden.dtype)
            kernels.gradient_products(tile, bases, rows, grad_h[r0:r1] if need_hidden else None,
                                      grad_b if need_bases else None, first=r0 == 0)
    del buffer
    if need_bases and n == 0:
        grad_b.zero_()  # no strip ran: the gradient is zero

    dh = db = None
    if need_hidden:
        dh = (kernels.normalization_backward(hidden, inv_h, grad_h, sim.eps, False) if inv_h is not None
              else grad_h.to(hidden.dtype))
    if need_bases:
        db = (kernels.normalization_backward(bases, inv_b, grad_b, sim.eps, True) if inv_b is not None
              else grad_b.to(bases.dtype))
    return per_row, lse, dh, db


# --- GEMMs with fp32 accumulation through ATen (cuBLAS on a GPU), shared by the GPU backends -----

def mm_f32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation in cuBLAS for bf16 / fp16 inputs)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    try:
        result = torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a torch (or device) without mm(out_dtype=): upcast
        result = torch.mm(a.float(), b.float())
    return result if out is None else out.copy_(result)


def bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b with an fp32 result."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return torch.bmm(a.float(), b.float())


def add_mm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b into an fp32 accumulator without an (m, n) temporary where torch allows."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        acc += mm_f32(a, b)


class TorchNormalization:
    """Inverse norms and the normalisation backward in torch (in place on an accumulate-dtype
    gradient): the strip pieces of every backend without norm kernels of its own."""

    def inverse_norms(self, x, eps):
        return inverse_norms(x, eps)

    def normalization_backward(self, x, inv, grad, eps, grad_times_inv):
        return normalization_backward(x, inv, grad, eps, grad_times_inv=grad_times_inv,
                                      out=grad if grad.dtype == x.dtype else None)


H200_SMS = 132  # the SM count assumed where no GPU is asked (the interpreter, tests of the geometry)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H200's 132 where there is no GPU to ask)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H200_SMS


class AtenGemms:
    """The three GEMMs of the strip algorithm on a GPU: inputs in their own dtype (tensor cores
    for bf16 / fp16), fp32 results; the gradient tile is cast to the inputs' dtype for its GEMMs."""

    def scores(self, rows, bases, out):
        mm_f32(rows, bases.T, out=out)

    def gradient_products(self, tile, bases, rows, grad_rows, grad_bases, first):
        tile = tile.to(bases.dtype)  # one cast serves both GEMMs
        if grad_rows is not None:
            mm_f32(tile, bases, out=grad_rows)
        if grad_bases is not None:
            if first:
                grad_bases.zero_()
            add_mm_f32(grad_bases, tile.T, rows)


def merge_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k best of its candidates (rows, m), sorted descending; an empty slot (index
    -1) never wins a tie with a real candidate, and equal values keep their candidate order."""
    real_first = torch.argsort((indices < 0).to(torch.uint8), dim=1, stable=True)
    values, indices = values.gather(1, real_first), indices.gather(1, real_first)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)
