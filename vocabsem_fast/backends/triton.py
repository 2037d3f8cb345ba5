"""The ``triton`` backend: fused Triton kernels (``vocabsem_fast.kernels.similarity``) for the
cross-entropy forward and backward, top-k / hard assignment and small-K soft assignment.

Row norms are computed once per tensor here and passed to the kernels as inverse norms; the
kernels return gradients with respect to the normalised rows and the exact gradient of the
normalisation is applied here (O(N d + V d) work). What the kernels do not cover runs the
chunked algorithm: float64 inputs (gradcheck), similarity logits (their output is N x V by
definition), top-k with k > ``MAX_FUSED_K`` and soft assignment with more than
``MAX_SOFT_ASSIGN_K`` centroids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import CrossEntropy, Similarity
from .chunked import ChunkedBackend, reduce_rows, row_upstream, torch_row_norms

MAX_FUSED_K = 64


class TritonBackend(ChunkedBackend):
    # gradient filtering threshold for the backward (0: exact, every tile)
    filter_eps: float = 0.0

    def __init__(self):
        super().__init__("triton", torch_row_norms)
        from ..kernels import similarity as kernels  # noqa: PLC0415  (imports triton)

        self.kernels = kernels

    @staticmethod
    def _fused(*tensors: Tensor) -> bool:
        return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)

    def _inverse_norms(self, x: Tensor, sim: Similarity) -> Tensor | None:
        return self._normalizer(x, sim).inv  # None when not normalising

    def cross_entropy(self, hidden, bases, targets, sim: Similarity, ce: CrossEntropy,
                      need_hidden: bool = False, need_bases: bool = False):
        if not self._fused(hidden, bases):
            return super().cross_entropy(hidden, bases, targets, sim, ce, need_hidden, need_bases)
        hidden, bases = hidden.contiguous(), bases.contiguous()
        per_row, lse = self.kernels.cross_entropy_forward(
            hidden, bases, targets.contiguous(), self._inverse_norms(hidden, sim), self._inverse_norms(bases, sim),
            sim.scale, ce.ignore_index, ce.label_smoothing)
        return reduce_rows(per_row, targets != ce.ignore_index, ce.reduction), lse, None, None

    def cross_entropy_backward(self, grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases):
        if not self._fused(hidden, bases):
            return super().cross_entropy_backward(grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases)
        hidden, bases = hidden.contiguous(), bases.contiguous()
        upstream = row_upstream(grad.to(torch.float32), targets != ce.ignore_index, ce.reduction)
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        dhn, dbn = self.kernels.cross_entropy_backward(
            hidden, bases, targets.contiguous(), h.inv, b.inv, lse.to(torch.float32).contiguous(), upstream,
            sim.scale, ce.ignore_index, ce.label_smoothing, need_hidden, need_bases, self.filter_eps)
        dh = h.backward(dhn, h.rows()).to(hidden.dtype) if need_hidden else None
        db = self._bases_grad(dbn, b, bases) if need_bases else None
        return dh, db

    def topk(self, hidden, bases, k: int, sim: Similarity):
        if k > MAX_FUSED_K or not self._fused(hidden, bases):
            return super().topk(hidden, bases, k, sim)
        hidden, bases = hidden.contiguous(), bases.contiguous()
        return self.kernels.topk(hidden, bases, self._inverse_norms(hidden, sim), self._inverse_norms(bases, sim),
                                 sim.scale, k)

    def soft_assign(self, points, centroids, sim: Similarity):
        if centroids.shape[1] > self.kernels.MAX_SOFT_ASSIGN_K or not self._fused(points, centroids):
            return super().soft_assign(points, centroids, sim)
        points, centroids = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse_norms(points.reshape(-1, points.shape[-1]), sim)
        inv_c = self._inverse_norms(centroids.reshape(-1, centroids.shape[-1]), sim)
        return self.kernels.soft_assign(points, centroids, inv_p, inv_c, sim.scale)
