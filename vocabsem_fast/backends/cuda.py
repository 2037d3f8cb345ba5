"""The ``cuda`` backend: cuBLAS GEMMs (through ATen) on row strips against the whole vocabulary,
with the fused CUDA epilogue kernels of ``vocabsem_fast._C`` (csrc/cuda) in between.

Cross-entropy, per strip of R rows (R x V fp32 scores at most ``STRIP_ELEMENTS``): one GEMM for
the raw dot products; ``lse_merge`` / ``lse_finish`` fold in the inverse row norms and the scale
and give the loss and log-sum-exp; when gradients are wanted, ``softmax_grad_tile`` turns the
scores in place into ``weight * scale * (softmax - target)`` (times the bases' inverse norms),
a GEMM gives the hidden rows' gradient, ``rescale_tile`` swaps the norm factor and a third GEMM
accumulates the bases' gradient; ``normalization_backward`` finishes both. As on the CPU, a
reduced loss gets its gradients from the forward pass (three GEMMs in all). Top-k and hard
assignment merge each strip's scores into a running per-row top-k (k <= 64) without writing
N x V; soft assignment with K <= 64 runs fully fused, forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import CrossEntropy, Similarity, accumulate_dtype
from .chunked import ChunkedBackend, reduce_rows, row_upstream, torch_row_norms

STRIP_ELEMENTS = 1 << 27  # fp32 scores per strip: 512 MiB
MAX_FUSED_K = 64
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation in cuBLAS for bf16 / fp16 inputs)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a torch without mm(out_dtype=): upcast
        return torch.mm(a.float(), b.float())


def _add_mm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b into an fp32 accumulator without an (m, n) temporary where torch allows."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        acc += _mm_f32(a, b)


class CudaBackend(ChunkedBackend):
    gradients_in_forward = True  # for reduced losses, as the cpu backend

    def __init__(self, ext):
        super().__init__("cuda", torch_row_norms)
        self.ext = ext

    def _inverse(self, x: Tensor, sim: Similarity) -> Tensor | None:
        return self.ext.cuda_row_inverse_norms(x, sim.eps) if sim.normalize else None

    def _unnormalize(self, x: Tensor, inv: Tensor | None, grad: Tensor, sim: Similarity) -> Tensor:
        out = grad if inv is None else self.ext.cuda_normalization_backward(x, inv, grad, sim.eps)
        return out.to(x.dtype)

    @staticmethod
    def _strips(n: int, v: int):
        rows = max(1, STRIP_ELEMENTS // max(v, 1))
        for start in range(0, n, rows):
            yield start, min(n, start + rows)

    # --- cross-entropy ---------------------------------------------------------------------------
    def _fused(self, hidden, bases, targets, sim: Similarity, ce: CrossEntropy, weight: Tensor,
               need_hidden: bool, need_bases: bool):
        """Per-row loss and lse, and the gradients of sum_i weight_i * loss_i (None if not needed)."""
        h, b, t = hidden.contiguous(), bases.contiguous(), targets.contiguous()
        n, v, d = h.shape[0], b.shape[0], h.shape[1]
        inv_h, inv_b = self._inverse(h, sim), self._inverse(b, sim)
        f32 = dict(dtype=torch.float32, device=h.device)
        loss, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        dhn = torch.empty(n, d, **f32) if need_hidden else None
        dbn = torch.zeros(v, d, **f32) if need_bases else None
        weight = weight.to(torch.float32).expand(n).contiguous()
        for r0, r1 in self._strips(n, v):
            rows = r1 - r0
            hs, ts = h[r0:r1], t[r0:r1]
            ih = None if inv_h is None else inv_h[r0:r1]
            scores = _mm_f32(hs, b.T)
            state = [torch.full((rows,), float("-inf"), **f32)] + [torch.zeros(rows, **f32) for _ in range(3)]
            self.ext.cuda_lse_merge(scores, 0, sim.scale, ih, inv_b, ts, ce.label_smoothing, *state)
            lse[r0:r1], loss[r0:r1] = self.ext.cuda_lse_finish(*state, ts, ce.ignore_index, ce.label_smoothing, v)
            if not (need_hidden or need_bases):
                continue
            self.ext.cuda_softmax_grad_tile(scores, 0, sim.scale, ih, inv_b, lse[r0:r1], ts, weight[r0:r1],
                                            ce.label_smoothing, v, inv_b)
            if need_hidden:
                dhn[r0:r1] = _mm_f32(scores.to(b.dtype), b)
            if need_bases:
                if inv_h is not None:
                    self.ext.cuda_rescale_tile(scores, ih, inv_b)
                _add_mm_f32(dbn, scores.to(h.dtype).T, hs)
        dh = self._unnormalize(h, inv_h, dhn, sim) if need_hidden else None
        db = self._unnormalize(b, inv_b, dbn, sim) if need_bases else None
        return loss, lse, dh, db

    def cross_entropy(self, hidden, bases, targets, sim, ce, need_hidden=False, need_bases=False):
        if hidden.dtype not in _FUSED_DTYPES:
            return super().cross_entropy(hidden, bases, targets, sim, ce, need_hidden, need_bases)
        valid = targets != ce.ignore_index
        in_forward = ce.reduction != "none" and (need_hidden or need_bases)
        weight = row_upstream(torch.ones((), dtype=accumulate_dtype(hidden.dtype), device=hidden.device), valid,
                              ce.reduction)
        per_row, lse, dh, db = self._fused(hidden, bases, targets, sim, ce, weight, need_hidden and in_forward,
                                           need_bases and in_forward)
        return reduce_rows(per_row, valid, ce.reduction), lse, dh, db

    def cross_entropy_backward(self, grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases):
        if hidden.dtype not in _FUSED_DTYPES:
            return super().cross_entropy_backward(grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases)
        weight = row_upstream(grad.to(torch.float32), targets != ce.ignore_index, ce.reduction)
        _, _, dh, db = self._fused(hidden, bases, targets, sim, ce, weight, need_hidden, need_bases)
        return dh, db

    # --- top-k / hard assignment -----------------------------------------------------------------
    def topk(self, hidden, bases, k: int, sim: Similarity):
        if k > MAX_FUSED_K or sim.scale <= 0 or hidden.dtype not in _FUSED_DTYPES:
            return super().topk(hidden, bases, k, sim)  # taken entries are marked -inf: needs scale > 0
        h, b = hidden.contiguous(), bases.contiguous()
        inv_h, inv_b = self._inverse(h, sim), self._inverse(b, sim)
        n, v = h.shape[0], b.shape[0]
        values = torch.full((n, k), float("-inf"), dtype=torch.float32, device=h.device)
        indices = torch.full((n, k), -1, dtype=torch.int64, device=h.device)
        for r0, r1 in self._strips(n, v):
            scores = _mm_f32(h[r0:r1], b.T)
            vals, idx = values[r0:r1], indices[r0:r1]  # contiguous row slices: updated in place
            self.ext.cuda_topk_merge(scores, 0, sim.scale, None if inv_h is None else inv_h[r0:r1], inv_b, vals, idx)
        return values.to(accumulate_dtype(hidden.dtype)), indices

    # --- soft assignment ---------------------------------------------------------------------------
    def _soft_inputs(self, points, centroids, sim):
        p, c = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse(p.view(-1, p.shape[-1]), sim)
        inv_c = self._inverse(c.view(-1, c.shape[-1]), sim)
        return p, c, inv_p, inv_c

    def _soft_fused(self, points, centroids) -> bool:
        return centroids.shape[1] <= MAX_FUSED_K and points.dtype in _FUSED_DTYPES and centroids.shape[1] > 0

    def soft_assign(self, points, centroids, sim: Similarity):
        if not self._soft_fused(points, centroids):
            return super().soft_assign(points, centroids, sim)
        p, c, inv_p, inv_c = self._soft_inputs(points, centroids, sim)
        return self.ext.cuda_soft_assign_forward(p, c, inv_p, inv_c, sim.scale)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        if not self._soft_fused(points, centroids):
            return super().soft_assign_backward(grad, probs, points, centroids, sim, need_points, need_centroids)
        p, c, inv_p, inv_c = self._soft_inputs(points, centroids, sim)
        dpn, dcn = self.ext.cuda_soft_assign_backward(p, c, inv_p, inv_c, sim.scale, probs.float().contiguous(),
                                                      grad.float().contiguous())
        d = p.shape[-1]
        dp = self._unnormalize(p.view(-1, d), inv_p, dpn.view(-1, d), sim).view(points.shape) if need_points else None
        dc = (self._unnormalize(c.view(-1, d), inv_c, dcn.view(-1, d), sim).view(centroids.shape)
              if need_centroids else None)
        return dp, dc

    # --- k-means update ------------------------------------------------------------------------------
    def centroid_sums(self, points: Tensor, labels: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
        """Per-cluster sums (fp32) and counts of ``points`` by ``labels``."""
        return tuple(self.ext.cuda_centroid_sums(points.contiguous(), labels.contiguous(), clusters))
