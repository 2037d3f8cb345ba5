"""The chunked algorithm: N rows against V bases, one bounded tile at a time.

This is the pure-torch statement of what every fused backend does, step for step:

* row norms are computed once per tensor; a tile of normalised rows is formed on the fly, so
  neither the N x V score matrix nor a normalised copy of the bases is ever held;
* the forward loss walks over V in column chunks, carrying an online log-sum-exp (running max
  and rescaled sum), the target logit and, for label smoothing, the running sum of logits;
* the backward recomputes each tile from the saved log-sum-exp, forms
  ``upstream * (softmax - (1 - ls) * onehot - ls / V)`` and accumulates both GEMM gradients,
  then applies the exact gradient of the row normalisation;
* top-k and hard assignment keep a running top-k per row across chunks.

A tile holds at most ``TileConfig.max_elements`` scores (with at most ``max_rows`` rows), so the
extra memory is bounded by the tile and O(N + V) vectors, plus gradient-sized accumulators.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .._validation import host_reads_are_free
from ..options import LossOptions, SimilarityOptions, accumulate_dtype
from .interface import FLOATING, OPS, Backend, Capabilities
from .normalization import inverse_norms, normalization_backward
from .tiles import current_tiles

# |lse| beyond which a float32 log-sum-exp's rounding (ulp 7.6e-6 at 64) is worth a pass to remove
LARGE_LSE = 64.0


def row_blocks(n: int) -> Iterator[tuple[int, int]]:
    step = current_tiles().max_rows
    for start in range(0, n, step):
        yield start, min(n, start + step)


def column_chunks(rows: int, v: int) -> Iterator[tuple[int, int]]:
    tiles = current_tiles()
    width = max(tiles.min_columns, tiles.max_elements // max(rows, 1))
    for start in range(0, v, width):
        yield start, min(v, start + width)


def native_low_precision(x: Tensor) -> bool:
    """Half-precision GEMMs that run natively: bf16 on the CPU (oneDNN), bf16 / fp16 on a GPU."""
    return x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x.device.type == "cuda")


def scaled_soft_assign(points: Tensor, centroids: Tensor, sim: SimilarityOptions, inverse_norms_fn) -> Tensor:
    """Soft assignment (B, N, K) in float32 from a native half-precision bmm (fp32 accumulation,
    a rounded product as the naive path's): inverse norms enter as scales, so the points are
    never widened or copied normalised."""
    scores = torch.bmm(points, centroids.transpose(1, 2)).float()
    if sim.normalize:
        inv_p = inverse_norms_fn(points.reshape(-1, points.shape[-1]), sim.eps).view(points.shape[:-1])
        inv_c = inverse_norms_fn(centroids.reshape(-1, centroids.shape[-1]), sim.eps).view(centroids.shape[:-1])
        scores.mul_(inv_p[..., None]).mul_(inv_c[:, None, :])
    return torch.softmax(scores.mul_(sim.scale), dim=-1)


class RowNormalizer:
    """Rows of ``x`` in the accumulation dtype, divided by ``max(||row||, eps)`` when normalising,
    produced a slice at a time, with the matching backward."""

    def __init__(self, x: Tensor, sim: SimilarityOptions):
        self.x = x
        self.eps = sim.eps
        self.acc = accumulate_dtype(x.dtype)
        self.inv = inverse_norms(x, sim.eps) if sim.normalize else None

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        x = self.x[start:stop].to(self.acc)
        return x if self.inv is None else x * self.inv[start:stop, None]

    def backward(self, grad: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Gradient w.r.t. the raw rows [start, stop) given the gradient w.r.t. their normalised form."""
        if self.inv is None:
            return grad
        return normalization_backward(self.x[start:stop], self.inv[start:stop], grad, self.eps,
                                      out=grad if grad.dtype == self.acc else None)


class TorchBackend(Backend):
    """The chunked algorithm in plain torch: every op, any device and floating dtype. It is the
    ``torch`` backend and the registry's fallback for whatever another backend does not cover."""

    name = "torch"
    capabilities = Capabilities(devices=("cpu", "cuda"), dtypes=FLOATING, ops=frozenset(OPS))

    # --- similarity logits (materialised by definition: the output is N x V) -------------------
    def logits(self, hidden, bases, sim):
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        out = hidden.new_empty(hidden.shape[0], bases.shape[0])
        for r0, r1 in row_blocks(hidden.shape[0]):
            hs = h.rows(r0, r1) * sim.scale
            for c0, c1 in column_chunks(r1 - r0, bases.shape[0]):
                out[r0:r1, c0:c1] = hs @ b.rows(c0, c1).T
        return out

    def logits_backward(self, grad, hidden, bases, sim, need_hidden, need_bases):
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        acc = h.acc
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        for r0, r1 in row_blocks(hidden.shape[0]):
            hs = h.rows(r0, r1) * sim.scale
            dhs = torch.zeros_like(hs) if need_hidden else None
            for c0, c1 in column_chunks(r1 - r0, bases.shape[0]):
                g = grad[r0:r1, c0:c1].to(acc)
                if need_hidden:
                    dhs.addmm_(g, b.rows(c0, c1))
                if need_bases:
                    dbn[c0:c1].addmm_(g.T, hs)
            if need_hidden:
                dh[r0:r1] = h.backward(dhs.mul_(sim.scale), r0, r1)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    @staticmethod
    def _bases_grad(dbn: Tensor, b: RowNormalizer, bases: Tensor) -> Tensor:
        """The normalisation backward of an accumulated (V, d) gradient, in its buffer."""
        if b.inv is None:
            return dbn.to(bases.dtype)
        return normalization_backward(bases, b.inv, dbn, b.eps, out=dbn).to(bases.dtype)

    # --- cross-entropy ---------------------------------------------------------------------------
    def cross_entropy(self, hidden, bases, targets, sim: SimilarityOptions, loss: LossOptions, weight=None,
                      need_hidden=False, need_bases=False):
        """Per-row loss and log-sum-exp from an online log-sum-exp over column chunks. Gradients
        are never formed here (the log-sum-exp is final only after the last chunk):
        ``cross_entropy_backward`` recomputes the tiles."""
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        n, v = hidden.shape[0], bases.shape[0]
        acc = h.acc
        valid = targets != loss.ignore_index
        safe_targets = torch.where(valid, targets, 0)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target_logit = torch.zeros(n, dtype=acc, device=hidden.device)
        logit_sum = torch.zeros(n, dtype=acc, device=hidden.device)
        for r0, r1 in row_blocks(n):
            hs = h.rows(r0, r1) * sim.scale
            t = safe_targets[r0:r1]
            running_max = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=hidden.device)
            running_sum = torch.zeros(r1 - r0, dtype=acc, device=hidden.device)
            for c0, c1 in column_chunks(r1 - r0, v):
                z = hs @ b.rows(c0, c1).T
                in_chunk = (t >= c0) & (t < c1)
                local = (t - c0).clamp(0, c1 - c0 - 1)
                picked = z.gather(1, local[:, None]).squeeze(1)
                target_logit[r0:r1] += torch.where(in_chunk, picked, 0.0)
                if loss.label_smoothing > 0:
                    logit_sum[r0:r1] += z.sum(1)
                new_max = torch.maximum(running_max, z.amax(dim=1))
                # rows whose scores are all -inf so far keep a finite shift (exp(-inf - 0) = 0)
                shift = torch.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * torch.exp(running_max - shift) + z.sub_(shift[:, None]).exp_().sum(1)
                running_max = new_max
            lse[r0:r1] = torch.where(running_max == float("-inf"), 0.0, running_max) + torch.log(running_sum)
        ls = loss.label_smoothing
        per_row = lse - (1.0 - ls) * target_logit
        if ls > 0:
            per_row = per_row - ls * logit_sum / v
        return torch.where(valid, per_row, 0.0), lse, None, None

    def cross_entropy_backward(self, row_weight, hidden, bases, targets, lse, sim, loss, need_hidden, need_bases):
        """Gradients of ``sum_i row_weight_i * loss_i`` (``row_weight`` is 0 where the target is ignored)."""
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        n, v = hidden.shape[0], bases.shape[0]
        acc = h.acc
        valid = targets != loss.ignore_index
        safe_targets = torch.where(valid, targets, 0)
        row_weight = row_weight.to(acc)
        ls = loss.label_smoothing
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        for r0, r1 in row_blocks(n):
            hs = h.rows(r0, r1) * sim.scale
            t = safe_targets[r0:r1]
            # the one-hot part of each row's gradient, built in the accumulation dtype (float64 stays exact)
            target_weight = torch.full((r1 - r0,), 1.0 - ls, dtype=acc, device=hidden.device)
            dhs = torch.zeros_like(hs) if need_hidden else None
            residual = self._lse_residual(hs, b, v, lse[r0:r1], sim)
            for c0, c1 in column_chunks(r1 - r0, v):
                bn = b.rows(c0, c1)
                z = hs @ bn.T
                z.sub_(lse[r0:r1, None])
                grad_z = (z if residual is None else z.sub_(residual[:, None])).exp_()
                if ls > 0:
                    grad_z.sub_(ls / v)
                in_chunk = (t >= c0) & (t < c1)
                local = (t - c0).clamp(0, c1 - c0 - 1)
                grad_z.scatter_add_(1, local[:, None], torch.where(in_chunk, -target_weight, 0.0)[:, None])
                grad_z.mul_(row_weight[r0:r1, None])
                if need_hidden:
                    dhs.addmm_(grad_z, bn)
                if need_bases:
                    dbn[c0:c1].addmm_(grad_z.T, hs)
            if need_hidden:
                dh[r0:r1] = h.backward(dhs.mul_(sim.scale), r0, r1)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    @staticmethod
    def _lse_may_be_large(lse: Tensor, sim: SimilarityOptions, v: int) -> bool:
        """Whether some |lse| may pass LARGE_LSE: known from the options for cosine logits
        (|lse| <= |scale| + log V), read from the data where that is free, assumed elsewhere (one
        more pass rather than a host sync)."""
        if sim.normalize and abs(sim.scale) + math.log(v) <= LARGE_LSE:
            return False
        return bool((lse.abs() > LARGE_LSE).any()) if host_reads_are_free(lse) else True

    @classmethod
    def _lse_residual(cls, hs: Tensor, b: RowNormalizer, v: int, lse: Tensor,
                      sim: SimilarityOptions) -> Tensor | None:
        """The error of a float32 log-sum-exp, or None where it is negligible. Stored in float32 it
        is off by up to half an ulp of itself (3e-5 at 1e3: raw dot-product logits), and that error
        enters every softmax entry of the backward; one more pass over the chunks sums exp(z - lse),
        whose log is the error, precisely (the sum is 1 to 1e-5). The softmax is then
        exp((z - lse) - residual), with no rounding of lse + residual in between."""
        if lse.dtype != torch.float32 or not cls._lse_may_be_large(lse, sim, v):
            return None
        total = torch.zeros_like(lse)
        for c0, c1 in column_chunks(hs.shape[0], v):
            total += (hs @ b.rows(c0, c1).T).sub_(lse[:, None]).exp_().sum(1)
        return torch.log(total)

    # --- top-k (and hard assignment, k = 1) ------------------------------------------------------
    def topk(self, hidden, bases, k: int, sim: SimilarityOptions):
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        n, v = hidden.shape[0], bases.shape[0]
        values = torch.empty(n, k, dtype=h.acc, device=hidden.device)
        indices = torch.empty(n, k, dtype=torch.long, device=hidden.device)
        for r0, r1 in row_blocks(n):
            hs = h.rows(r0, r1) * sim.scale
            best_v = hs.new_empty(r1 - r0, 0)
            best_i = indices.new_empty(r1 - r0, 0)
            for c0, c1 in column_chunks(r1 - r0, v):
                cv, ci = torch.topk(hs @ b.rows(c0, c1).T, min(k, c1 - c0), dim=1)
                merged_v = torch.cat([best_v, cv], dim=1)
                merged_i = torch.cat([best_i, ci + c0], dim=1)
                best_v, pick = torch.topk(merged_v, min(k, merged_v.shape[1]), dim=1)
                best_i = merged_i.gather(1, pick)
            values[r0:r1], indices[r0:r1] = best_v, best_i
        return values, indices

    def topk_backward(self, grad_values, hidden, bases, indices, sim, need_hidden, need_bases):
        h, b = RowNormalizer(hidden, sim), RowNormalizer(bases, sim)
        acc, d, k = h.acc, hidden.shape[1], indices.shape[1]
        grad_values = grad_values.to(acc)
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        rows_per_block = max(1, current_tiles().max_elements // max(k * d, 1))
        for r0 in range(0, hidden.shape[0], rows_per_block):
            r1 = min(hidden.shape[0], r0 + rows_per_block)
            hn = h.rows(r0, r1)
            idx, g = indices[r0:r1], grad_values[r0:r1]
            if need_hidden:
                picked = bases[idx.reshape(-1)].to(acc)
                if b.inv is not None:
                    picked = picked * b.inv[idx.reshape(-1), None]
                dhs = torch.einsum("nk,nkd->nd", g, picked.view(r1 - r0, k, d))
                dh[r0:r1] = h.backward(dhs.mul_(sim.scale), r0, r1)
            if need_bases:
                contrib = (g[:, :, None] * (hn * sim.scale)[:, None, :]).reshape(-1, d)
                dbn.index_add_(0, idx.reshape(-1), contrib)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    # --- soft assignment, batched (B, N, d) x (B, K, d) -----------------------------------------
    @staticmethod
    def _batched_normalized(x: Tensor, sim: SimilarityOptions) -> tuple[RowNormalizer, Tensor]:
        norm = RowNormalizer(x.reshape(-1, x.shape[-1]), sim)
        return norm, norm.rows().view(x.shape)

    def soft_assign(self, points, centroids, sim):
        if native_low_precision(points):
            return scaled_soft_assign(points, centroids, sim, inverse_norms)
        _, pn = self._batched_normalized(points, sim)
        _, cn = self._batched_normalized(centroids, sim)
        return torch.softmax(torch.bmm(pn, cn.transpose(1, 2)) * sim.scale, dim=-1)

    def soft_assign_backward(self, grad, probs, points, centroids, sim, need_points, need_centroids):
        p_norm, pn = self._batched_normalized(points, sim)
        c_norm, cn = self._batched_normalized(centroids, sim)
        grad = grad.to(probs.dtype)
        grad_scores = probs * (grad - (grad * probs).sum(-1, keepdim=True)) * sim.scale
        dp = dc = None
        if need_points:
            dpn = torch.bmm(grad_scores, cn).reshape(-1, points.shape[-1])
            dp = p_norm.backward(dpn).view(points.shape).to(points.dtype)
        if need_centroids:
            dcn = torch.bmm(grad_scores.transpose(1, 2), pn).reshape(-1, centroids.shape[-1])
            dc = c_norm.backward(dcn).view(centroids.shape).to(centroids.dtype)
        return dp, dc

    def batched_argmax(self, points, centroids, sim):
        return batched_argmax_by_topk(self, points, centroids, sim)

    # --- k-means update --------------------------------------------------------------------------
    def centroid_sums(self, points, labels, clusters):
        acc = accumulate_dtype(points.dtype)
        sums = torch.zeros(clusters, points.shape[1], dtype=acc, device=points.device)
        sums.index_add_(0, labels, points.to(acc))
        return sums, torch.bincount(labels, minlength=clusters).to(acc)


def batched_argmax_by_topk(backend: Backend, points: Tensor, centroids: Tensor,
                           sim: SimilarityOptions) -> tuple[Tensor, Tensor]:
    """Hard assignment of B problems as B calls of ``backend.topk`` with k = 1 (a backend whose
    calls cost no launch: the torch and cpu backends)."""
    indices = torch.empty(points.shape[:2], dtype=torch.long, device=points.device)
    scores = torch.empty(points.shape[:2], dtype=accumulate_dtype(points.dtype), device=points.device)
    for b in range(points.shape[0]):
        values, best = backend.topk(points[b], centroids[b], 1, sim)
        scores[b], indices[b] = values[:, 0], best[:, 0]
    return indices, scores
