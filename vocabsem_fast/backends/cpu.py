"""The ``cpu`` backend: C++ kernels of ``vocabsem_fast._C`` where they exist, the chunked
algorithm (with C++ row norms) for the rest.

The fused cross-entropy works on row strips against the whole vocabulary, so when the loss is
reduced and gradients are wanted it returns them from the forward pass (three GEMMs in all);
the autograd backward then only scales them by the upstream gradient. A forward without
gradients runs the chunked online algorithm; "none" recomputes the strips in backward. Top-k
(and so hard assignment) scans GEMM tiles with a running per-row top-k in C++.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import CrossEntropy, Similarity, accumulate_dtype
from .chunked import _TILES, ChunkedBackend, reduce_rows, row_upstream

# The C++ top-k keeps each row's best k sorted and inserts by shifting: cheap for the k of
# decoding, lenses and hard assignment; larger k takes the chunked path (torch.topk per tile).
MAX_FUSED_K = 64

# A strip holds R x V scores for R rows; measured best near 4 chunked tiles (64 MiB of float32 at
# the default tile) at the SmolLM2 shape: GEMMs with R in the hundreds, epilogue rows in L2.
STRIP_TILES = 4


class CpuBackend(ChunkedBackend):
    gradients_in_forward = True  # for reduced losses

    def __init__(self, ext):
        super().__init__("cpu", ext.row_norms)
        self.ext = ext

    def _fused(self, hidden, bases, targets, sim: Similarity, ce: CrossEntropy, weight: Tensor,
               need_hidden: bool, need_bases: bool):
        """The C++ strips: per-row loss, lse and the gradients of sum_i weight_i * loss_i."""
        return self.ext.similarity_cross_entropy(
            hidden, bases, targets, sim.scale, sim.normalize, sim.eps, ce.ignore_index, ce.label_smoothing,
            weight, need_hidden, need_bases, STRIP_TILES * _TILES.max_elements,
        )

    def cross_entropy(self, hidden, bases, targets, sim, ce, need_hidden=False, need_bases=False):
        if ce.reduction == "none" or not (need_hidden or need_bases):
            # No gradients now: the chunked online log-sum-exp keeps its tiles in cache, which
            # measured faster than a full-vocabulary strip (bench/results/foundation-cpu.md).
            return super().cross_entropy(hidden, bases, targets, sim, ce)
        valid = targets != ce.ignore_index
        weight = row_upstream(torch.ones((), dtype=accumulate_dtype(hidden.dtype)), valid, ce.reduction)
        per_row, lse, dh, db = self._fused(hidden, bases, targets, sim, ce, weight, need_hidden, need_bases)
        return (reduce_rows(per_row, valid, ce.reduction), lse,
                dh if need_hidden else None, db if need_bases else None)

    def cross_entropy_backward(self, grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases):
        weight = row_upstream(grad.to(lse.dtype), targets != ce.ignore_index, ce.reduction)
        _, _, dh, db = self._fused(hidden, bases, targets, sim, ce, weight, need_hidden, need_bases)
        return (dh if need_hidden else None), (db if need_bases else None)

    def topk(self, hidden, bases, k: int, sim: Similarity):
        if k > MAX_FUSED_K:
            return super().topk(hidden, bases, k, sim)
        return tuple(self.ext.similarity_topk(hidden, bases, k, sim.scale, sim.normalize, sim.eps, _TILES.max_elements))
