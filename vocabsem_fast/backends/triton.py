"""The ``triton`` backend: fused Triton kernels (``vocabsem_fast.kernels.similarity``) for the
cross-entropy forward and backward, top-k / hard assignment and small-K soft assignment.

Row norms are computed once per tensor here and passed to the kernels as inverse norms; the
kernels return gradients with respect to the normalised rows and the exact gradient of the
normalisation is applied here (O(N d + V d) work). float64 inputs (gradcheck), similarity
logits (their output is N x V by definition), top-k with k > ``max_topk`` and soft assignment
with more centroids than the kernel holds are not covered: the registry runs them on the torch
backend. The soft-assignment backward is the torch form (a (B, N, K) product of the saved probabilities).
"""

from __future__ import annotations

import torch

from ..options import SimilarityOptions
from .chunked import TorchBackend
from .interface import Backend, Capabilities
from .normalization import inverse_norms, normalization_backward


class TritonBackend(Backend):
    """``filter_eps``: the backward skips a tile whose largest |softmax - target| is below it
    (gradient filtering; 0, the default, is exact)."""

    name = "triton"

    def __init__(self, *, filter_eps: float = 0.0):
        from ..kernels import similarity as triton_similarity  # noqa: PLC0415  (imports triton)

        self.triton_similarity = triton_similarity
        self.filter_eps = float(filter_eps)
        self._torch = TorchBackend()
        self.capabilities = Capabilities(
            devices=("cuda", "cpu"),  # CPU tensors only under the Triton interpreter
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            ops=frozenset({"cross_entropy", "topk", "soft_assign"}),
            max_topk=triton_similarity.MAX_TOPK,
            max_soft_assign_k=triton_similarity.MAX_SOFT_ASSIGN_K,
        )

    @staticmethod
    def _inverse(x, sim: SimilarityOptions):
        return inverse_norms(x, sim.eps) if sim.normalize else None

    def cross_entropy(self, hidden, bases, targets, sim, loss, weight=None, need_hidden=False, need_bases=False):
        hidden, bases = hidden.contiguous(), bases.contiguous()
        per_row, lse = self.triton_similarity.cross_entropy_forward(
            hidden, bases, targets.contiguous(), self._inverse(hidden, sim), self._inverse(bases, sim),
            sim.scale, loss.ignore_index, loss.label_smoothing)
        return per_row, lse, None, None

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        hidden, bases = hidden.contiguous(), bases.contiguous()
        inv_h, inv_b = self._inverse(hidden, sim), self._inverse(bases, sim)
        dhn, dbn = self.triton_similarity.cross_entropy_backward(
            hidden, bases, targets.contiguous(), inv_h, inv_b, lse.to(torch.float32).contiguous(),
            row_weight.to(torch.float32).contiguous(), sim.scale, loss.ignore_index, loss.label_smoothing,
            need_hidden, need_bases, self.filter_eps)
        dh = db = None
        if need_hidden:
            dh = dhn.to(hidden.dtype) if inv_h is None else normalization_backward(hidden, inv_h, dhn, sim.eps)
        if need_bases:
            db = dbn.to(bases.dtype) if inv_b is None else normalization_backward(bases, inv_b, dbn, sim.eps)
        return dh, db

    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        hidden, bases = hidden.contiguous(), bases.contiguous()
        return self.triton_similarity.topk(hidden, bases, self._inverse(hidden, sim), self._inverse(bases, sim),
                                           sim.scale, k)

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        return self._torch.topk_backward(grad_values, hidden, bases, indices, sim, need_hidden, need_bases)

    def soft_assign(self, points, centroids, sim: SimilarityOptions):
        points, centroids = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse(points.reshape(-1, points.shape[-1]), sim)
        inv_c = self._inverse(centroids.reshape(-1, centroids.shape[-1]), sim)
        return self.triton_similarity.soft_assign(points, centroids, inv_p, inv_c, sim.scale)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        return self._torch.soft_assign_backward(grad, probs, points, centroids, sim, need_points, need_centroids)
