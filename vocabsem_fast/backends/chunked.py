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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import CrossEntropy, Similarity, accumulate_dtype

RowNorms = Callable[[Tensor], Tensor]


def torch_row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1, dtype=accumulate_dtype(x.dtype))


@dataclass
class TileConfig:
    max_rows: int = 4096
    max_elements: int = 1 << 22  # 16 MiB of float32 scores
    min_columns: int = 16


_TILES = TileConfig()


@contextlib.contextmanager
def tile_config(**overrides) -> Iterator[TileConfig]:
    """Temporarily change the tile bounds (tests use tiny tiles to exercise many chunks)."""
    saved = dict(_TILES.__dict__)
    _TILES.__dict__.update(overrides)
    try:
        yield _TILES
    finally:
        _TILES.__dict__.update(saved)


def row_blocks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, _TILES.max_rows):
        yield start, min(n, start + _TILES.max_rows)


def column_chunks(rows: int, v: int) -> Iterator[tuple[int, int]]:
    width = max(_TILES.min_columns, _TILES.max_elements // max(rows, 1))
    for start in range(0, v, width):
        yield start, min(v, start + width)


class RowNormalizer:
    """Rows of ``x`` in the accumulation dtype, divided by ``max(||row||, eps)`` when normalising,
    produced a slice at a time, with the matching backward."""

    def __init__(self, x: Tensor, sim: Similarity, row_norms: RowNorms):
        self.x = x
        self.acc = accumulate_dtype(x.dtype)
        self.inv = None
        if sim.normalize:
            norms = row_norms(x)
            self.inv = 1.0 / norms.clamp_min(sim.eps)
            self.passes = norms >= sim.eps  # where the clamp is inactive the norm itself has a gradient

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        x = self.x[start:stop].to(self.acc)
        return x if self.inv is None else x * self.inv[start:stop, None]

    def backward(self, grad: Tensor, normalized: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Gradient w.r.t. the raw rows given the gradient w.r.t. ``normalized = rows(start, stop)``."""
        if self.inv is None:
            return grad
        # d(x / |x|) = (g - y (y . g)) / |x|; where the eps clamp is active only g / eps remains
        radial = torch.where(self.passes[start:stop], torch.linalg.vecdot(normalized, grad), 0.0)
        out = torch.addcmul(grad, normalized, radial[:, None], value=-1.0)
        return out.mul_(self.inv[start:stop, None])


class ChunkedBackend:
    """Chunked implementation of every op; ``row_norms`` is the only swappable piece (torch or C++)."""

    gradients_in_forward = False  # the loss gradients always come from cross_entropy_backward

    def __init__(self, name: str, row_norms: RowNorms):
        self.name = name
        self.row_norms = row_norms

    def _normalizer(self, x: Tensor, sim: Similarity) -> RowNormalizer:
        return RowNormalizer(x, sim, self.row_norms)

    # --- similarity logits (materialised by definition: the output is N x V) -------------------
    def logits(self, hidden: Tensor, bases: Tensor, sim: Similarity) -> Tensor:
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        out = hidden.new_empty(hidden.shape[0], bases.shape[0])
        for r0, r1 in row_blocks(hidden.shape[0]):
            hs = h.rows(r0, r1) * sim.scale
            for c0, c1 in column_chunks(r1 - r0, bases.shape[0]):
                out[r0:r1, c0:c1] = hs @ b.rows(c0, c1).T
        return out

    def logits_backward(self, grad, hidden, bases, sim, need_hidden, need_bases):
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        acc = h.acc
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        for r0, r1 in row_blocks(hidden.shape[0]):
            hn = h.rows(r0, r1)
            hs = hn * sim.scale
            dhs = torch.zeros_like(hn) if need_hidden else None
            for c0, c1 in column_chunks(r1 - r0, bases.shape[0]):
                bn = b.rows(c0, c1)
                g = grad[r0:r1, c0:c1].to(acc)
                if need_hidden:
                    dhs.addmm_(g, bn)
                if need_bases:
                    dbn[c0:c1].addmm_(g.T, hs)
            if need_hidden:
                dh[r0:r1] = h.backward(dhs * sim.scale, hn, r0, r1)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    def _bases_grad(self, dbn: Tensor, b: RowNormalizer, bases: Tensor) -> Tensor:
        """Apply the normalisation backward to an accumulated (V, d) gradient, chunk by chunk
        (in place when the accumulator already has the bases' dtype: no second V x d buffer)."""
        if dbn.dtype == bases.dtype and b.inv is None:
            return dbn
        out = dbn if dbn.dtype == bases.dtype else torch.empty_like(bases)
        width = max(_TILES.min_columns, _TILES.max_elements // max(bases.shape[1], 1))
        for c0 in range(0, bases.shape[0], width):
            c1 = min(bases.shape[0], c0 + width)
            out[c0:c1] = b.backward(dbn[c0:c1], b.rows(c0, c1), c0, c1)
        return out

    # --- cross-entropy ---------------------------------------------------------------------------
    def cross_entropy(self, hidden, bases, targets, sim: Similarity, ce: CrossEntropy,
                      need_hidden: bool = False, need_bases: bool = False):
        """Per-row or reduced loss and the per-row log-sum-exp. Gradients are never formed here
        (the online log-sum-exp is final only after the last chunk): the two ``None`` tell the op
        to run ``cross_entropy_backward``, which recomputes the tiles."""
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        n, v = hidden.shape[0], bases.shape[0]
        acc = h.acc
        valid = targets != ce.ignore_index
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
                if ce.label_smoothing > 0:
                    logit_sum[r0:r1] += z.sum(1)
                new_max = torch.maximum(running_max, z.amax(dim=1))
                # rows whose scores are all -inf so far keep a finite shift (exp(-inf - 0) = 0)
                shift = torch.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * torch.exp(running_max - shift) + z.sub_(shift[:, None]).exp_().sum(1)
                running_max = new_max
            lse[r0:r1] = torch.where(running_max == float("-inf"), 0.0, running_max) + torch.log(running_sum)
        ls = ce.label_smoothing
        per_row = lse - (1.0 - ls) * target_logit
        if ls > 0:
            per_row = per_row - ls * logit_sum / v
        return reduce_rows(torch.where(valid, per_row, 0.0), valid, ce.reduction), lse, None, None

    def cross_entropy_backward(self, grad, hidden, bases, targets, lse, sim, ce, need_hidden, need_bases):
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        n, v = hidden.shape[0], bases.shape[0]
        acc = h.acc
        valid = targets != ce.ignore_index
        row_grad = row_upstream(grad.to(acc), valid, ce.reduction)
        safe_targets = torch.where(valid, targets, 0)
        ls = ce.label_smoothing
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        for r0, r1 in row_blocks(n):
            hn = h.rows(r0, r1)
            hs = hn * sim.scale
            t = safe_targets[r0:r1]
            dhs = torch.zeros_like(hn) if need_hidden else None
            for c0, c1 in column_chunks(r1 - r0, v):
                bn = b.rows(c0, c1)
                grad_z = (hs @ bn.T).sub_(lse[r0:r1, None]).exp_()
                if ls > 0:
                    grad_z.sub_(ls / v)
                in_chunk = (t >= c0) & (t < c1)
                local = (t - c0).clamp(0, c1 - c0 - 1)
                onehot = torch.where(in_chunk, -(1.0 - ls), 0.0).to(acc)
                grad_z.scatter_add_(1, local[:, None], onehot[:, None])
                grad_z.mul_(row_grad[r0:r1, None])
                if need_hidden:
                    dhs.addmm_(grad_z, bn)
                if need_bases:
                    dbn[c0:c1].addmm_(grad_z.T, hs)
            if need_hidden:
                dh[r0:r1] = h.backward(dhs * sim.scale, hn, r0, r1)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    # --- top-k (and hard assignment, k = 1) ------------------------------------------------------
    def topk(self, hidden, bases, k: int, sim: Similarity):
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
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
        h, b = self._normalizer(hidden, sim), self._normalizer(bases, sim)
        acc, d, k = h.acc, hidden.shape[1], indices.shape[1]
        grad_values = grad_values.to(acc)
        dbn = torch.zeros(bases.shape, dtype=acc, device=bases.device) if need_bases else None
        dh = torch.empty_like(hidden) if need_hidden else None
        rows_per_block = max(1, _TILES.max_elements // max(k * d, 1))
        for r0 in range(0, hidden.shape[0], rows_per_block):
            r1 = min(hidden.shape[0], r0 + rows_per_block)
            hn = h.rows(r0, r1)
            idx, g = indices[r0:r1], grad_values[r0:r1]
            if need_hidden:
                picked = bases[idx.reshape(-1)].to(acc)
                if b.inv is not None:
                    picked = picked * b.inv[idx.reshape(-1), None]
                dhs = torch.einsum("nk,nkd->nd", g, picked.view(r1 - r0, k, d))
                dh[r0:r1] = h.backward(dhs * sim.scale, hn, r0, r1)
            if need_bases:
                contrib = (g[:, :, None] * (hn * sim.scale)[:, None, :]).reshape(-1, d)
                dbn.index_add_(0, idx.reshape(-1), contrib)
        return dh, self._bases_grad(dbn, b, bases) if need_bases else None

    # --- soft assignment, batched (B, N, d) x (B, K, d) -----------------------------------------
    def _batched_normalized(self, x: Tensor, sim: Similarity) -> tuple[RowNormalizer, Tensor]:
        norm = self._normalizer(x.reshape(-1, x.shape[-1]), sim)
        return norm, norm.rows().view(x.shape)

    def soft_assign(self, points, centroids, sim: Similarity):
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
            dp = p_norm.backward(dpn, pn.reshape(-1, points.shape[-1])).view(points.shape).to(points.dtype)
        if need_centroids:
            dcn = torch.bmm(grad_scores.transpose(1, 2), pn).reshape(-1, centroids.shape[-1])
            dc = c_norm.backward(dcn, cn.reshape(-1, centroids.shape[-1])).view(centroids.shape).to(centroids.dtype)
        return dp, dc


def reduce_rows(per_row: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """"none" keeps rows; "mean" divides by the non-ignored count (0.0 when there are none)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1).to(total.dtype)


def row_upstream(grad: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """The upstream gradient of each row's loss (zero for ignored rows)."""
    if reduction == "none":
        return torch.where(valid, grad, 0.0)
    if reduction == "mean":
        grad = grad / valid.sum().clamp_min(1).to(grad.dtype)
    return torch.where(valid, grad.expand(valid.shape), 0.0)
