"""The ``cpu`` backend: C++ kernels of ``vocabsem_fast._C`` where they exist, the chunked
algorithm (with C++ row norms) for the rest.

The fused cross-entropy works on row strips against the whole vocabulary, so when the loss is
reduced and gradients are wanted it returns them from the forward pass (three GEMMs in all);
the autograd backward then only scales them by the upstream gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import CrossEntropy, Similarity, accumulate_dtype
from .chunked import _TILES, ChunkedBackend, reduce_rows, row_upstream


class CpuBackend(ChunkedBackend):
    gradients_in_forward = True  # for reduced losses

    def __init__(self, ext):
        super().__init__("cpu", ext.row_norms)
        self.ext = ext

    def _fused(self, hidden, bases, targets, sim: Similarity, ce: CrossEntropy, weight: Tensor | None,
               need_hidden: bool, need_bases: bool):
        if weight is None:
            weight = hidden.new_empty(0, dtype=accumulate_dtype(hidden.dtype))
        return self.ext.similarity_cross_entropy(
            hidden, bases, targets, sim.scale, sim.normalize, sim.eps, ce.ignore_index, ce.label_smoothing,
            weight, need_hidden, need_bases, _TILES.max_elements,
        )

    def cross_entropy(self, hidden, bases, targets, sim, ce, need_hidden=False, need_bases=False):
        valid = targets != ce.ignore_index
        grads_now = ce.reduction != "none" and (need_hidden or need_bases)
        weight = None
        if grads_now:
            one = torch.ones((), dtype=accumulate_dtype(hidden.dtype))
            weight = row_upstream(one, valid, ce.reduction)
        per_row, lse, dh, db = self._fused(
            hidden, bases, targets, sim, ce, weight, grads_now and need_hidden, grads_now and need_bases
        )
        return (reduce_rows(per_row, valid, ce.reduction), lse,
                dh if grads_now and need_hidden else None, db if grads_now and need_bases else None)

    def cross_entropy_backward(self, grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases):
        weight = row_upstream(grad.to(lse.dtype), targets != ce.ignore_index, ce.reduction)
        _, _, dh, db = self._fused(hidden, bases, targets, sim, ce, weight, need_hidden, need_bases)
        return (dh if need_hidden else None), (db if need_bases else None)
