"""The ``triton`` backend: Triton kernels (``vocabsem_fast.kernels.similarity``) for the
cross-entropy, top-k / hard assignment and small-K soft assignment.

* A loss without gradients runs the fused forward kernel: programs over (row block, vocabulary
  split), nothing N x V in memory, the whole GPU busy even for one row.
* A loss with gradients runs the strip algorithm (``strips.py``) as the cuda backend does: three
  cuBLAS GEMMs on row strips with the Triton strip epilogue in between, and for a reduced loss
  the gradients come out of the forward pass. Why not a fused backward: its tiles would add their
  products into the fp32 gradients with atomics, V / BLOCK_V adds per hidden-gradient element,
  and gradient filtering (what lets Cut Cross-Entropy skip most of them on raw head logits) skips
  0.1% of tiles at similarity logits (bench/results/gradient-filtering.json); the strips cost a
  bounded fp32 workspace and one pass over it instead.
* Row norms are computed once per tensor (torch) and enter the kernels as scales.

float64 inputs (gradcheck), similarity logits (an N x V output by definition), top-k with
k > ``max_topk`` and soft assignment with more centroids than the kernel holds are not covered:
the registry runs them on the torch backend. The soft-assignment backward is the torch form.
"""

from __future__ import annotations

import torch

from ..options import SimilarityOptions
from .chunked import TorchBackend
from .interface import Backend, Capabilities
from .normalization import inverse_norms
from .strips import AtenGemms, TorchNormalization, strip_cross_entropy

STRIP_ELEMENTS = 1 << 27  # fp32 scores per strip: 512 MiB on a GPU


class TritonStripKernels(AtenGemms, TorchNormalization):
    """The strip algorithm's pieces: cuBLAS GEMMs (ATen), torch norms and the Triton strip epilogue."""

    def __init__(self, triton_similarity):
        self.triton_similarity = triton_similarity

    def epilogue(self, scores, row_scale, col_scale, targets, ignore_index, weight, smoothing):
        return self.triton_similarity.strip_epilogue(scores, row_scale, col_scale, targets, ignore_index, weight,
                                                     smoothing)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, *, strip_elements: int = STRIP_ELEMENTS):
        from ..kernels import similarity as triton_similarity  # noqa: PLC0415  (imports triton)

        self.triton_similarity = triton_similarity
        self.kernels = TritonStripKernels(triton_similarity)
        self.strip_elements = strip_elements
        self._torch = TorchBackend()
        self.capabilities = Capabilities(
            devices=("cuda", "cpu"),  # CPU tensors only under the Triton interpreter
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            ops=frozenset({"cross_entropy", "topk", "soft_assign", "batched_argmax"}),
            max_topk=triton_similarity.MAX_TOPK,
            max_soft_assign_k=triton_similarity.MAX_SOFT_ASSIGN_K,
            gradients_in_forward=True,
        )

    @staticmethod
    def _inverse(x, sim: SimilarityOptions):
        return inverse_norms(x, sim.eps) if sim.normalize else None

    def cross_entropy(self, hidden, bases, targets, sim, loss, weight=None, need_hidden=False, need_bases=False):
        hidden, bases, targets = hidden.contiguous(), bases.contiguous(), targets.contiguous()
        if weight is not None and (need_hidden or need_bases):
            return strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, weight, need_hidden,
                                       need_bases, 4 * self.strip_elements)
        per_row, lse = self.triton_similarity.cross_entropy_forward(
            hidden, bases, targets, self._inverse(hidden, sim), self._inverse(bases, sim),
            sim.scale, loss.ignore_index, loss.label_smoothing)
        return per_row, lse, None, None

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        hidden, bases, targets = hidden.contiguous(), bases.contiguous(), targets.contiguous()
        _, _, dh, db = strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, row_weight, need_hidden,
                                           need_bases, 4 * self.strip_elements)
        return dh, db

    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        hidden, bases = hidden.contiguous(), bases.contiguous()
        return self.triton_similarity.topk(hidden, bases, self._inverse(hidden, sim), self._inverse(bases, sim),
                                           sim.scale, k)

    def batched_argmax(self, points, centroids, sim: SimilarityOptions):
        points, centroids = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse(points.reshape(-1, points.shape[-1]), sim)
        inv_c = self._inverse(centroids.reshape(-1, centroids.shape[-1]), sim)
        values, indices = self.triton_similarity.batched_topk(
            points, centroids, None if inv_p is None else inv_p.view(points.shape[:2]),
            None if inv_c is None else inv_c.view(centroids.shape[:2]), sim.scale, 1)
        return indices[..., 0], values[..., 0]

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        return self._torch.topk_backward(grad_values, hidden, bases, indices, sim, need_hidden, need_bases)

    def soft_assign(self, points, centroids, sim: SimilarityOptions):
        points, centroids = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse(points.reshape(-1, points.shape[-1]), sim)
        inv_c = self._inverse(centroids.reshape(-1, centroids.shape[-1]), sim)
        return self.triton_similarity.soft_assign(points, centroids, inv_p, inv_c, sim.scale)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        return self._torch.soft_assign_backward(grad, probs, points, centroids, sim, need_points, need_centroids)
