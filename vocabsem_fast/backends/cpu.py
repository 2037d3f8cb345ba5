"""The ``cpu`` backend: the C++ kernels of ``vocabsem_fast._C`` (csrc/cpu).

Cross-entropy runs the strip algorithm (``strips.py``) with ATen GEMMs and the C++ SIMD strip
epilogue; a reduced loss gets its gradients from the forward pass (three GEMMs in all) and the
autograd backward only scales them. bf16 inputs multiply natively (oneDNN). A forward without
gradients runs the strips too for bf16, and for fp32 / fp16 the chunked online log-sum-exp of the
torch backend, whose tiles stay in cache (measured faster than a full-vocabulary strip in fp32:
bench/results/foundation-cpu.md). Top-k (and so hard assignment) scans GEMM tiles with a running
per-row top-k in C++. Logits, soft assignment and the k-means update are not fused here: the
registry runs them on the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import SimilarityOptions
from .chunked import TorchBackend, batched_argmax_by_topk
from .interface import Backend, Capabilities
from .strips import TorchNormalization, strip_cross_entropy
from .tiles import current_tiles

# A strip holds R x V scores; measured best near 4 chunked tiles (64 MiB of float32 at the
# default tile) at the SmolLM2 shape: GEMMs with R in the hundreds, epilogue rows in L2.
STRIP_TILES = 4
# Half-precision bases are converted to float32 this many rows at a time inside the GEMMs.
CONVERT_ROWS = 4096


class CpuStripKernels(TorchNormalization):
    """The strip algorithm's pieces on the CPU: ATen GEMMs, C++ row norms and the C++ epilogue."""

    def __init__(self, ext):
        self.ext = ext

    def inverse_norms(self, x: Tensor, eps: float) -> Tensor:
        return self.ext.row_norms(x).clamp_min_(eps).reciprocal_()

    @staticmethod
    def _chunks(bases: Tensor, dtype: torch.dtype):
        """(start, stop, rows in dtype): fp32 / fp64 bases whole, others a chunk at a time (converted
        to ``dtype`` when it differs)."""
        if bases.dtype == dtype and dtype in (torch.float32, torch.float64):
            yield 0, bases.shape[0], bases
            return
        for c0 in range(0, bases.shape[0], CONVERT_ROWS):
            c1 = min(bases.shape[0], c0 + CONVERT_ROWS)
            yield c0, c1, bases[c0:c1].to(dtype)

    @staticmethod
    def _native(x: Tensor) -> bool:
        """bf16 GEMMs run natively (oneDNN, AVX512-BF16 / AMX) on their own inputs."""
        return x.dtype == torch.bfloat16

    def scores(self, rows, bases, out):
        if self._native(bases):
            # bf16 x bf16 on oneDNN, a V-chunk at a time; each chunk's product is rounded to bf16
            # (as the naive bf16 path rounds its logits) and lands in the fp32 strip
            for c0, c1, chunk in self._chunks(bases, bases.dtype):
                out[:, c0:c1] = torch.mm(rows, chunk.T)
            return
        rows = rows.to(out.dtype)
        for c0, c1, chunk in self._chunks(bases, out.dtype):
            torch.mm(rows, chunk.T, out=out[:, c0:c1])

    def epilogue(self, scores, row_scale, col_scale, targets, ignore_index, weight, smoothing):
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        return self.ext.cross_entropy_strip(scores, row_scale.contiguous(), col_scale, safe, valid, weight, smoothing)

    def gradient_products(self, tile, bases, rows, grad_rows, grad_bases, first):
        native = self._native(bases)
        if not native:
            rows = rows.to(tile.dtype)
        if grad_rows is not None:
            grad_rows.zero_()
        for c0, c1, chunk in self._chunks(bases, bases.dtype if native else tile.dtype):
            # a V-chunk of the tile, cast once for both GEMMs (bf16: oneDNN, fp32 sums across chunks)
            part = tile[:, c0:c1].to(chunk.dtype)
            if grad_rows is not None:
                if native:
                    grad_rows += torch.mm(part, chunk)
                else:
                    grad_rows.addmm_(part, chunk)
            if grad_bases is not None:
                target = grad_bases[c0:c1]
                if native:  # a bf16 product, added into the fp32 gradient
                    product = torch.mm(part.T, rows)
                    if first:
                        target.copy_(product)
                    else:
                        target.add_(product)
                elif first:
                    torch.mm(part.T, rows, out=target)
                else:
                    target.addmm_(part.T, rows)


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=("cpu",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        ops=frozenset({"cross_entropy", "topk", "batched_argmax"}),
        # the C++ top-k keeps each row's best k sorted and inserts by shifting: cheap for the k of
        # decoding, lenses and hard assignment; a larger k runs on the torch backend
        max_topk=64,
        gradients_in_forward=True,
    )

    def __init__(self, ext):
        self.ext = ext
        self.kernels = CpuStripKernels(ext)
        self._online = TorchBackend()  # the gradient-free forward (see the module docstring)

    def _strip_elements(self) -> int:
        return STRIP_TILES * current_tiles().max_elements

    def cross_entropy(self, hidden, bases, targets, sim, loss, weight=None, need_hidden=False, need_bases=False):
        if weight is None or not (need_hidden or need_bases):
            if self.kernels._native(bases):  # bf16: native GEMMs on strips beat fp32 chunks
                return strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, None, False, False,
                                           self._strip_elements())
            return self._online.cross_entropy(hidden, bases, targets, sim, loss)
        return strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, weight, need_hidden, need_bases,
                                   self._strip_elements())

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        _, _, dh, db = strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, row_weight, need_hidden,
                                           need_bases, self._strip_elements())
        return dh, db

    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        return tuple(self.ext.similarity_topk(hidden, bases, k, sim.scale, sim.normalize, sim.eps,
                                              current_tiles().max_elements))

    def batched_argmax(self, points, centroids, sim):
        return batched_argmax_by_topk(self, points, centroids, sim)  # the C++ top-1 of each problem

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        # one gather per picked basis: the torch form is already the whole computation
        return self._online.topk_backward(grad_values, hidden, bases, indices, sim, need_hidden, need_bases)
