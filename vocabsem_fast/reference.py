"""Plain, materialising implementations of every public function.

This module is the oracle of the test suite and the "naive" side of every benchmark: it builds
the full N x V (or N x K) score matrix with ordinary torch ops and lets autograd differentiate it.
It does no argument checking beyond what torch itself does. Float64 inputs stay float64 (for
``gradcheck``); every other dtype follows the contract of ``vocabsem_fast``: losses, top-k values
and assignment scores in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "semantic_bases",
    "similarity_logits",
    "similarity_cross_entropy",
    "similarity_topk",
    "assign",
    "kmeans",
]


def _result_float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def semantic_bases(lm_head_weight: Tensor, *, rcond: float | None = None) -> Tensor:
    """(V, d) semantic bases: ``pinv(L)^T`` in float64, returned in L's dtype."""
    w = lm_head_weight.double()
    pinv = torch.linalg.pinv(w) if rcond is None else torch.linalg.pinv(w, rcond=rcond)
    return pinv.T.to(lm_head_weight.dtype)


def similarity_logits(
    hidden: Tensor, bases: Tensor, *, scale: float = 1.0, normalize: bool = True, eps: float = 1e-8
) -> Tensor:
    """(..., V): ``scale * normalize(hidden) @ normalize(bases).T``."""
    if normalize:
        hidden = F.normalize(hidden, dim=-1, eps=eps)
        bases = F.normalize(bases, dim=-1, eps=eps)
    return scale * (hidden @ bases.T)


def similarity_cross_entropy(
    hidden: Tensor,
    bases: Tensor,
    targets: Tensor,
    *,
    scale: float = 1.0,
    normalize: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    eps: float = 1e-8,
    weight: Tensor | None = None,
    z_loss: float = 0.0,
) -> Tensor:
    """``F.cross_entropy`` on the materialised float32 similarity logits, plus the z-loss.

    ``weight`` (V,) has ``F.cross_entropy``'s meaning; ``z_loss`` adds ``w[t] * z_loss * lse**2``
    to each non-ignored row (``w[t]`` = 1 without ``weight``). "mean" divides by the summed
    weights of the non-ignored targets (their count without ``weight``), and is 0.0 (with zero
    gradients) when that sum is zero, where ``F.cross_entropy`` would give NaN.
    """
    V = bases.shape[0]
    logits = _result_float(similarity_logits(hidden, bases, scale=scale, normalize=normalize, eps=eps))
    logits = logits.reshape(-1, V)
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    class_weight = None if weight is None else weight.to(logits.dtype)
    per_row = F.cross_entropy(logits, flat_targets, weight=class_weight, ignore_index=ignore_index,
                              reduction="none", label_smoothing=label_smoothing)
    row_weight = valid.to(logits.dtype)
    if class_weight is not None:
        row_weight = row_weight * class_weight[torch.where(valid, flat_targets, 0)]
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        per_row = per_row + torch.where(valid, row_weight * z_loss * lse.square(), 0.0)
    if reduction == "none":
        return per_row.reshape(targets.shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    denominator = row_weight.sum()
    return total / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def similarity_topk(
    hidden: Tensor, bases: Tensor, k: int, *, scale: float = 1.0, normalize: bool = True, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """``torch.topk`` of the materialised similarity logits; values in float32."""
    logits = similarity_logits(hidden, bases, scale=scale, normalize=normalize, eps=eps)
    values, indices = torch.topk(logits, k, dim=-1)
    return _result_float(values), indices


def _scores(points: Tensor, centroids: Tensor, normalize: bool, eps: float) -> Tensor:
    if normalize:
        points = F.normalize(points, dim=-1, eps=eps)
        centroids = F.normalize(centroids, dim=-1, eps=eps)
    return points @ centroids.transpose(-1, -2)


def assign(
    points: Tensor,
    centroids: Tensor,
    *,
    temperature: float = 1.0,
    hard: bool = False,
    normalize: bool = True,
    eps: float = 1e-8,
):
    """Soft assignments ``softmax(scores / temperature)`` (float32), or ``(indices, scores)`` of
    the best centroid when ``hard``."""
    scores = _result_float(_scores(points, centroids, normalize, eps))
    if hard:
        best, indices = scores.max(dim=-1)
        return indices, best
    return torch.softmax(scores / temperature, dim=-1)


def _kmeans_pp(points: Tensor, k: int, metric: str, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its distance
    (squared L2, or cosine distance) to the nearest centre chosen so far."""
    n = points.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centres = [points[first]]
    nearest = _distance_to(points, points[first], metric)
    for _ in range(1, k):
        weights = nearest.clamp_min(0).double()
        if float(weights.sum()) <= 0:  # every point sits on a centre: pick uniformly
            weights = torch.ones_like(weights)
        nxt = torch.multinomial(weights.cpu(), 1, generator=generator).item()
        centres.append(points[nxt])
        nearest = torch.minimum(nearest, _distance_to(points, points[nxt], metric))
    return torch.stack(centres)


def _distance_to(points: Tensor, centre: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        return 1.0 - points @ centre
    return ((points - centre) ** 2).sum(-1)


def _prepare_kmeans_points(points: Tensor, metric: str, eps: float = 1e-8) -> Tensor:
    pts = points.double() if points.dtype == torch.float64 else points.float()
    return F.normalize(pts, dim=-1, eps=eps) if metric == "cosine" else pts


def _update_centroids(points: Tensor, labels: Tensor, old: Tensor, metric: str, eps: float = 1e-8) -> Tensor:
    """Mean of each cluster's points (renormalised for cosine); an empty cluster keeps its centre."""
    k = old.shape[0]
    sums = torch.zeros_like(old).index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=k).to(points.dtype)
    return _centroids_from_sums(sums, counts, old, metric, eps)


def _centroids_from_sums(sums: Tensor, counts: Tensor, old: Tensor, metric: str, eps: float = 1e-8) -> Tensor:
    """Cluster means from per-cluster sums and counts; an empty cluster keeps its centre."""
    sums, counts = sums.to(old.dtype), counts.to(old.dtype)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    if metric == "cosine":
        means = F.normalize(means, dim=-1, eps=eps)
    return torch.where((counts > 0).unsqueeze(1), means, old)


def kmeans(points: Tensor, k: int, *, iters: int = 20, metric: str = "cosine", seed: int = 0):
    """Lloyd's k-means with k-means++ seeding, on the full N x k distance matrix."""
    pts = _prepare_kmeans_points(points, metric)
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(pts, k, metric, generator)
    labels = _reference_labels(pts, centroids, metric)
    for _ in range(iters):
        centroids = _update_centroids(pts, labels, centroids, metric)
        labels = _reference_labels(pts, centroids, metric)
    return centroids.to(points.dtype), labels


def _reference_labels(points: Tensor, centroids: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        return (points @ centroids.T).argmax(dim=-1)
    return torch.cdist(points, centroids).argmin(dim=-1)
