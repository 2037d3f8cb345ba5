"""Row normalisation ``x / max(|x|, eps)`` as the backends apply it: inverse norms enter the
kernels as scales (no normalised copy of the bases is made), and the exact gradient of the
normalisation is applied once, to an accumulated gradient. This is the torch form, for every
backend but cuda (which has the same two steps as CUDA kernels)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import accumulate_dtype
from .tiles import current_tiles


def row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulate_dtype(x.dtype))


def inverse_norms(x: Tensor, eps: float) -> Tensor:
    """1 / max(|row|, eps), in the accumulation dtype; NaN for a row holding an infinite entry.
    An infinite norm is either an overflow of finite entries (the row normalises to 0, and its
    inverse norm 0 says so) or an infinite entry (the row normalises to NaN, as the reference's
    x / max(|x|, eps) does): the kernels scale raw scores by these, so the two must differ."""
    inverse = row_norms(x).clamp_min_(eps).reciprocal_()
    # the largest magnitude of each row, a reduction with no intermediate of x's size
    largest = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, dtype=inverse.dtype)
    return inverse.masked_fill_(largest == float("inf"), float("nan"))


TEMPORARIES = 4  # float32 blocks the backward below holds at once (y, g, the norms' and vecdot's)


def _block_rows(d: int) -> int:
    return max(1, current_tiles().max_elements // 8 // max(d, 1))  # 2 MiB temporaries at the default


def normalization_temporaries(d: int) -> int:
    """Bytes of temporaries ``normalization_backward`` holds at once for rows of width ``d``."""
    return TEMPORARIES * _block_rows(d) * d * 4


def normalization_backward(x: Tensor, inv: Tensor, grad: Tensor, eps: float, *, grad_times_inv: bool = False,
                           out: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. the raw rows ``x`` (N, d) of ``y = x * inv`` given ``grad`` = dL/dy.

    ``(grad - y (y . grad)) * inv``; where the eps clamp is active (|x| < eps) the norm is a
    constant and only ``grad * inv`` remains. ``grad_times_inv``: ``grad`` already carries the
    factor ``inv`` (as the bases' gradient accumulated from inverse-norm-scaled tiles does), so
    the result is ``grad - y (y . grad)`` without a second factor. Works a row block at a time
    (bounded temporaries); writes into ``out`` (which may be ``grad``) or a new tensor of ``x``'s dtype.
    """
    out = torch.empty_like(x) if out is None else out
    in_place = out is grad and out.dtype == inv.dtype
    block = _block_rows(x.shape[1])
    for r0 in range(0, x.shape[0], block):
        r1 = min(x.shape[0], r0 + block)
        inv_rows = inv[r0:r1, None]
        y = x[r0:r1].to(inv.dtype).mul_(inv_rows) if x.dtype != inv.dtype else x[r0:r1] * inv_rows
        g = grad[r0:r1] if in_place else grad[r0:r1].to(inv.dtype, copy=True)
        passes = row_norms(x[r0:r1]) >= eps  # |x| >= eps: the norm itself has a gradient
        radial = torch.where(passes, torch.linalg.vecdot(y, g), 0.0)
        g.addcmul_(y, radial[:, None], value=-1.0)
        if not grad_times_inv:
            g.mul_(inv_rows)
        if not in_place:
            out[r0:r1] = g
    return out
