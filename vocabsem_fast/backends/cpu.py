"""The ``cpu`` backend: the C++ kernels of ``vocabsem_fast._C`` (csrc/cpu).

Cross-entropy runs the strip algorithm (``strips.py``) with ATen GEMMs and the C++ SIMD strip
epilogue, in the row plan (three GEMMs) or, where its strip and bases accumulator exceed the
workspace, the column plan; a reduced loss gets its gradients from the forward pass and the
autograd backward only scales them. bf16 inputs multiply natively (oneDNN: AVX512-BF16 / AMX)
and keep bf16 scores. A forward without gradients runs the strips too for bf16, and for fp32 /
fp16 the chunked online log-sum-exp of the torch backend, whose tiles stay in cache (measured
faster than a full-vocabulary strip in fp32: bench/results/foundation-cpu.md). Top-k (and so
hard assignment) scans GEMM tiles with a running per-row top-k in C++. Soft assignment of bf16
runs a native bmm with the C++ row norms as scales; other dtypes, its backward, logits and the
k-means update run on the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import SimilarityOptions, accumulate_dtype
from .chunked import TorchBackend, batched_argmax_by_topk, native_low_precision, scaled_soft_assign
from .interface import Backend, Capabilities
from .strips import TorchNormalization, strip_cross_entropy
from .tiles import current_tiles

# The strips' workspace: 4 chunked tiles (64 MiB), measured best at the SmolLM2 shape in float32
# (GEMMs with R in the hundreds, epilogue rows in L2), or, when the bases' gradient is formed, an
# eighth of the bases' own size if that is more: the row plan then keeps strips of hundreds of
# rows at a large head (see strips.MIN_ACCUMULATING_ROWS), the column plan fewer chunks. The
# budget also picks the plan: rows where their strip and accumulators fit, columns elsewhere.
STRIP_TILES = 4
BASES_FRACTION = 8
# Half-precision bases without a native GEMM (fp16) are widened to float32 this many rows at a time.
CONVERT_ROWS = 4096


def _safe_targets(targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(targets with ignored rows pointing at column 0, the mask of rows that count): the C++
    epilogue's contract."""
    valid = targets != ignore_index
    return torch.where(valid, targets, 0), valid


class CpuStripKernels(TorchNormalization):
    """The strip algorithm's pieces on the CPU: ATen GEMMs, C++ row norms and the C++ epilogue.

    bf16 multiplies natively (oneDNN: AVX512-BF16 / AMX), fp32 accumulation inside the GEMM; its
    scores stay bf16 (rounded once, as the naive bf16 path rounds its logits) and the epilogue
    widens them a row at a time. fp16 has no native CPU GEMM here and runs in float32."""

    epilogue_zeroes_zero_scales = False  # the orchestration finds such rows: a free read on the CPU

    def __init__(self, ext):
        self.ext = ext

    @staticmethod
    def _native(dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16

    def score_dtype(self, dtype):
        return dtype if self._native(dtype) else accumulate_dtype(dtype)

    def inverse_norms(self, x: Tensor, eps: float) -> Tensor:
        return self.ext.row_norms(x).clamp_min_(eps).reciprocal_()

    @staticmethod
    def _chunks(bases: Tensor, dtype: torch.dtype):
        """(start, stop, rows in dtype): bases already in ``dtype`` whole, others a chunk at a time."""
        if bases.dtype == dtype:
            yield 0, bases.shape[0], bases
            return
        for c0 in range(0, bases.shape[0], CONVERT_ROWS):
            c1 = min(bases.shape[0], c0 + CONVERT_ROWS)
            yield c0, c1, bases[c0:c1].to(dtype)

    def scores(self, rows, bases, out):
        if out.dtype != rows.dtype:
            rows = rows.to(out.dtype)
        for c0, c1, chunk in self._chunks(bases, out.dtype):
            torch.mm(rows, chunk.T, out=out[:, c0:c1] if c1 - c0 < out.shape[1] else out)

    def epilogue(self, scores, row_scale, col_scale, targets, ignore_index, weight, smoothing):
        safe, valid = _safe_targets(targets, ignore_index)
        return self.ext.cross_entropy_strip(scores, row_scale.contiguous(), col_scale, safe, valid, weight, smoothing)

    def chunk_partials(self, scores, row_scale, col_scale, targets, ignore_index, smoothing, col_offset, vocab):
        safe, valid = _safe_targets(targets, ignore_index)
        return self.ext.cross_entropy_strip(scores, row_scale.contiguous(), col_scale, safe, valid, None, smoothing,
                                            col_offset=col_offset, vocab=vocab)

    def chunk_epilogue(self, scores, row_scale, col_scale, targets, ignore_index, weight, smoothing, lse, col_offset,
                       vocab):
        safe, valid = _safe_targets(targets, ignore_index)
        self.ext.cross_entropy_strip(scores, row_scale.contiguous(), col_scale, safe, valid, weight.contiguous(),
                                     smoothing, lse=lse.contiguous(), col_offset=col_offset, vocab=vocab)

    def gradient_products(self, tile, bases, rows, grad_rows, grad_bases, first_rows, first_bases):
        if self._native(tile.dtype):
            self._native_products(tile, bases, rows, grad_rows, grad_bases, first_rows, first_bases)
            return
        rows = rows.to(tile.dtype) if rows is not None else None
        if grad_rows is not None and first_rows:
            grad_rows.zero_()
        for c0, c1, chunk in self._chunks(bases, tile.dtype):
            part = tile[:, c0:c1] if c1 - c0 < tile.shape[1] else tile
            if grad_rows is not None:
                grad_rows.addmm_(part, chunk)
            if grad_bases is not None:
                if first_bases:
                    torch.mm(part.T, rows, out=grad_bases[c0:c1])
                else:
                    grad_bases[c0:c1].addmm_(part.T, rows)

    @staticmethod
    def _native_products(tile, bases, rows, grad_rows, grad_bases, first_rows, first_bases):
        """bf16 GEMMs; each product (rounded to bf16 once, as a bf16 GEMM's output is) lands in
        the fp32 gradients, or is the bf16 gradient itself when nothing else adds to it. Added
        products go CONVERT_ROWS rows at a time to bound their temporary."""
        if grad_rows is not None:
            product = torch.mm(tile, bases)
            if first_rows:
                grad_rows.copy_(product)
            else:
                grad_rows += product
        if grad_bases is not None:
            if first_bases and grad_bases.dtype == tile.dtype:  # straight into a bf16 gradient
                torch.mm(tile.T, rows, out=grad_bases)
                return
            for c0 in range(0, bases.shape[0], CONVERT_ROWS):
                c1 = min(bases.shape[0], c0 + CONVERT_ROWS)
                product = torch.mm(tile[:, c0:c1].T, rows)
                if first_bases:
                    grad_bases[c0:c1].copy_(product)
                else:
                    grad_bases[c0:c1] += product


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=("cpu",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        ops=frozenset({"cross_entropy", "topk", "batched_argmax", "soft_assign"}),
        # the C++ top-k keeps each row's best k sorted and inserts by shifting: cheap for the k of
        # decoding, lenses and hard assignment; a larger k runs on the torch backend
        max_topk=64,
        gradients_in_forward=True,
    )

    def __init__(self, ext):
        self.ext = ext
        self.kernels = CpuStripKernels(ext)
        self._online = TorchBackend()  # the gradient-free forward (see the module docstring)

    @staticmethod
    def workspace_bytes(bases: Tensor, need_bases: bool) -> int:
        tiles = STRIP_TILES * current_tiles().max_elements * 4
        return max(tiles, bases.numel() * bases.element_size() // BASES_FRACTION) if need_bases else tiles

    def cross_entropy(self, hidden, bases, targets, sim, loss, weight=None, need_hidden=False, need_bases=False):
        if weight is None or not (need_hidden or need_bases):
            if self.kernels._native(bases.dtype):  # bf16: native GEMMs on strips beat fp32 chunks
                return strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, None, False, False,
                                           self.workspace_bytes(bases, False))
            return self._online.cross_entropy(hidden, bases, targets, sim, loss)
        return strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, weight, need_hidden, need_bases,
                                   self.workspace_bytes(bases, need_bases))

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        _, _, dh, db = strip_cross_entropy(self.kernels, hidden, bases, targets, sim, loss, row_weight, need_hidden,
                                           need_bases, self.workspace_bytes(bases, need_bases))
        return dh, db

    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        return tuple(self.ext.similarity_topk(hidden, bases, k, sim.scale, sim.normalize, sim.eps,
                                              current_tiles().max_elements))

    def batched_argmax(self, points, centroids, sim):
        return batched_argmax_by_topk(self, points, centroids, sim)  # the C++ top-1 of each problem

    def soft_assign(self, points, centroids, sim):
        # bf16: a native bmm with the C++ row norms as scales; other dtypes as the torch backend
        if native_low_precision(points):
            return scaled_soft_assign(points.contiguous(), centroids.contiguous(), sim, self.kernels.inverse_norms)
        return self._online.soft_assign(points, centroids, sim)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        return self._online.soft_assign_backward(grad, probs, points, centroids, sim, need_points, need_centroids)

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        # one gather per picked basis: the torch form is already the whole computation
        return self._online.topk_backward(grad_values, hidden, bases, indices, sim, need_hidden, need_bases)
