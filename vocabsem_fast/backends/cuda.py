"""The ``cuda`` backend: cuBLAS GEMMs (through ATen) and the torch-free CUDA kernels of
``vocabsem_fast._C`` (csrc/cuda/similarity.cu).

Cross-entropy runs the strip algorithm (``strips.py``): the epilogue is ``lse_partial`` and
``lse_finish`` (loss and log-sum-exp), then ``softmax_grad_tile`` (the gradient tile, in place);
the normalisation backward is its own kernel. As on the CPU, a reduced loss gets its gradients
from the forward pass (three GEMMs in all). The log-sum-exp and top-k kernels split each row's
vocabulary over several blocks (``vocabulary_splits``) whose results merge exactly, so a few rows
still occupy every SM. Top-k and hard assignment take each strip's best without writing N x V;
soft assignment over few centroids runs fully fused, forward and backward; the k-means update
sums each cluster's points in one kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..gpu_geometry import balanced_splits, sm_count
from ..options import SimilarityOptions
from .chunked import TorchBackend
from .interface import Backend, Capabilities
from .strips import AtenGemms, bmm_f32, merge_topk, mm_f32, strip_cross_entropy

STRIP_ELEMENTS = 1 << 27  # fp32 scores per strip: 512 MiB
MIN_SPLIT_COLUMNS = 128  # a vocabulary split gives each of a block's 256 threads at least half a column


def vocabulary_splits(rows: int, cols: int, sms: int) -> int:
    """Column ranges per row for the log-sum-exp and top-k kernels (grid rows x splits): as many
    as finish soonest on ``sms`` SMs with few rows (``gpu_geometry.balanced_splits``), none
    narrower than MIN_SPLIT_COLUMNS, at most 65535 (grid axis 1)."""
    return balanced_splits(rows, cols, sms, max(1, min(cols // MIN_SPLIT_COLUMNS, 65535)))


class CudaStripKernels(AtenGemms):
    """The strip algorithm's pieces on the GPU: cuBLAS GEMMs and the CUDA epilogue kernels."""

    def __init__(self, ext):
        self.ext = ext

    def inverse_norms(self, x, eps):
        return self.ext.cuda_row_inverse_norms(x, eps)

    def epilogue(self, scores, row_scale, col_scale, targets, ignore_index, weight, smoothing):
        rows, vocab = scores.shape
        row_scale, targets = row_scale.contiguous(), targets.contiguous()
        splits = vocabulary_splits(rows, vocab, sm_count(scores.device))
        partial = self.ext.cuda_lse_partial(scores, 1.0, row_scale, col_scale, targets, smoothing, splits)
        lse, loss = self.ext.cuda_lse_finish(partial, targets, ignore_index, smoothing, vocab)
        if weight is not None:
            self.ext.cuda_softmax_grad_tile(scores, 0, 1.0, row_scale, col_scale, lse, targets, weight.contiguous(),
                                            smoothing, vocab, col_scale)
        return loss, lse

    def normalization_backward(self, x, inv, grad, eps, grad_times_inv, out=None):
        result = self.ext.cuda_normalization_backward(x.contiguous(), inv, grad.contiguous(), eps,
                                                      grad_times_inv).to(x.dtype)
        return result if out is None else out.copy_(result)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, ext):
        self.ext = ext
        self.kernels = CudaStripKernels(ext)
        self._torch = TorchBackend()
        self.capabilities = Capabilities(
            devices=("cuda",),
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            ops=frozenset({"cross_entropy", "topk", "soft_assign", "batched_argmax", "centroid_sums"}),
            max_topk=ext.cuda_max_topk,
            max_soft_assign_k=ext.cuda_max_soft_assign_k,
            topk_needs_positive_scale=True,  # taken entries are marked -inf, which a negative scale flips
            gradients_in_forward=True,
        )

    def _inverse(self, x: Tensor, sim: SimilarityOptions) -> Tensor | None:
        return self.ext.cuda_row_inverse_norms(x, sim.eps) if sim.normalize else None

    # --- cross-entropy ---------------------------------------------------------------------------
    def cross_entropy(self, hidden, bases, targets, sim, loss, weight=None, need_hidden=False, need_bases=False):
        h, b, t = hidden.contiguous(), bases.contiguous(), targets.contiguous()
        return strip_cross_entropy(self.kernels, h, b, t, sim, loss, weight, need_hidden, need_bases,
                                   4 * STRIP_ELEMENTS)

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        h, b, t = hidden.contiguous(), bases.contiguous(), targets.contiguous()
        _, _, dh, db = strip_cross_entropy(self.kernels, h, b, t, sim, loss, row_weight, need_hidden, need_bases,
                                           4 * STRIP_ELEMENTS)
        return dh, db

    # --- top-k / hard assignment -----------------------------------------------------------------
    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        h, b = hidden.contiguous(), bases.contiguous()
        inv_h, inv_b = self._inverse(h, sim), self._inverse(b, sim)
        n, v = h.shape[0], b.shape[0]
        values = torch.full((n, k), float("-inf"), dtype=torch.float32, device=h.device)
        indices = torch.full((n, k), -1, dtype=torch.int64, device=h.device)
        rows_per_strip = max(1, STRIP_ELEMENTS // max(v, 1))
        strip = torch.empty(min(n, rows_per_strip), v, dtype=torch.float32, device=h.device)
        for r0 in range(0, n, rows_per_strip):
            r1 = min(n, r0 + rows_per_strip)
            scores = mm_f32(h[r0:r1], b.T, out=strip[:r1 - r0])  # one strip buffer, written by the GEMM
            splits = vocabulary_splits(r1 - r0, v, sm_count(h.device))
            part_v, part_i = self.ext.cuda_topk_partial(scores, sim.scale, None if inv_h is None else inv_h[r0:r1],
                                                        inv_b, k, splits)
            values[r0:r1], indices[r0:r1] = merge_topk(part_v.permute(1, 0, 2).reshape(r1 - r0, -1),
                                                       part_i.permute(1, 0, 2).reshape(r1 - r0, -1), k)
        return values, indices

    def batched_argmax(self, points, centroids, sim: SimilarityOptions):
        """All B problems in each launch: one batched GEMM per strip of rows, the inverse norms
        applied to its (B, R, K) scores, one split top-1 over the B x R rows."""
        p, c = points.contiguous(), centroids.contiguous()
        batch, n, d = p.shape
        k = c.shape[1]
        inv_p = self._inverse(p.view(-1, d), sim)
        inv_c = self._inverse(c.view(-1, d), sim)
        indices = torch.empty(batch, n, dtype=torch.int64, device=p.device)
        scores = torch.empty(batch, n, dtype=torch.float32, device=p.device)
        rows_per_strip = max(1, STRIP_ELEMENTS // max(batch * k, 1))
        for r0 in range(0, n, rows_per_strip):
            r1 = min(n, r0 + rows_per_strip)
            tile = bmm_f32(p[:, r0:r1], c.transpose(1, 2))  # (B, R, K)
            if inv_p is not None:  # a zero factor (an overflowed norm) scores 0, even where the raw score is inf
                factor = inv_p.view(batch, n)[:, r0:r1, None] * inv_c.view(batch, k)[:, None, :]
                tile.mul_(factor).masked_fill_(factor == 0, 0.0)
            flat = tile.view(batch * (r1 - r0), k)
            splits = vocabulary_splits(flat.shape[0], k, sm_count(p.device))
            part_v, part_i = self.ext.cuda_topk_partial(flat, sim.scale, None, None, 1, splits)
            best, where = merge_topk(part_v.permute(1, 0, 2).reshape(flat.shape[0], -1),
                                     part_i.permute(1, 0, 2).reshape(flat.shape[0], -1), 1)
            scores[:, r0:r1], indices[:, r0:r1] = best.view(batch, -1), where.view(batch, -1)
        return indices, scores

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        # gathers of k bases per row: the torch form is the whole computation
        return self._torch.topk_backward(grad_values, hidden, bases, indices, sim, need_hidden, need_bases)

    # --- soft assignment ---------------------------------------------------------------------------
    def _soft_inputs(self, points, centroids, sim):
        p, c = points.contiguous(), centroids.contiguous()
        inv_p = self._inverse(p.view(-1, p.shape[-1]), sim)
        inv_c = self._inverse(c.view(-1, c.shape[-1]), sim)
        return p, c, inv_p, inv_c

    def soft_assign(self, points, centroids, sim: SimilarityOptions):
        p, c, inv_p, inv_c = self._soft_inputs(points, centroids, sim)
        return self.ext.cuda_soft_assign_forward(p, c, inv_p, inv_c, sim.scale)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        p, c, inv_p, inv_c = self._soft_inputs(points, centroids, sim)
        dpn, dcn = self.ext.cuda_soft_assign_backward(p, c, inv_p, inv_c, sim.scale, probs.float().contiguous(),
                                                      grad.float().contiguous())
        d = p.shape[-1]

        def unnormalize(x, inv, g):
            return (g if inv is None else self.kernels.normalization_backward(x, inv, g, sim.eps, False)).to(x.dtype)

        dp = unnormalize(p.view(-1, d), inv_p, dpn.view(-1, d)).view(points.shape) if need_points else None
        dc = unnormalize(c.view(-1, d), inv_c, dcn.view(-1, d)).view(centroids.shape) if need_centroids else None
        return dp, dc

    # --- k-means update ------------------------------------------------------------------------------
    def centroid_sums(self, points: Tensor, labels: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
        return tuple(self.ext.cuda_centroid_sums(points.contiguous(), labels.contiguous(), clusters))
