"""k-means on top of the fused hard assignment: the N x k distances are never held at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._validation import check_finite, check_float, check_int
from .ops import assign

METRICS = ("cosine", "l2")


def _prepare(points: Tensor, metric: str, eps: float = 1e-8) -> Tensor:
    """Points in the accumulation dtype, on the unit sphere for spherical k-means."""
    pts = points.double() if points.dtype == torch.float64 else points.float()
    return F.normalize(pts, dim=-1, eps=eps) if metric == "cosine" else pts


def _distance(points: Tensor, centre: Tensor, metric: str) -> Tensor:
    return 1.0 - points @ centre if metric == "cosine" else (points - centre).square().sum(-1)


def _seed_kmeans_pp(points: Tensor, k: int, metric: str, generator: torch.Generator) -> Tensor:
    """k-means++: each next centre drawn with probability proportional to its distance to the
    nearest centre so far (draws on the CPU generator, so a seed gives the same centres anywhere)."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = _distance(points, points[chosen[0]], metric)
    for _ in range(1, k):
        weights = nearest.clamp_min(0).double().cpu()
        if float(weights.sum()) <= 0:  # every point sits on a centre: draw uniformly
            weights = torch.ones_like(weights)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, _distance(points, points[chosen[-1]], metric))
    return points[chosen]


def _labels(points: Tensor, centroids: Tensor, metric: str, impl: str) -> Tensor:
    if metric == "cosine":  # points and centroids are unit vectors: the best dot product
        return assign(points, centroids, hard=True, normalize=False, impl=impl)[0]
    # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2): one more column turns it into a dot product
    ones = points.new_ones(points.shape[0], 1)
    half_sq = -0.5 * centroids.square().sum(-1, keepdim=True)
    return assign(torch.cat([points, ones], 1), torch.cat([centroids, half_sq], 1), hard=True, normalize=False,
                  impl=impl)[0]


def _update(points: Tensor, labels: Tensor, old: Tensor, metric: str, impl: str) -> Tensor:
    """Each cluster's mean (renormalised for cosine); an empty cluster keeps its centre. The
    backend sums the clusters (one fused kernel on the cuda backend)."""
    name = backends.resolve(impl, points.device)
    backend = backends.select(name, "centroid_sums", points.device, points.dtype)
    sums, counts = backend.centroid_sums(points, labels, old.shape[0])
    sums, counts = sums.to(old.dtype), counts.to(old.dtype)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    if metric == "cosine":
        means = F.normalize(means, dim=-1, eps=1e-8)
    return torch.where((counts > 0).unsqueeze(1), means, old)


def kmeans(points: Tensor, k: int, *, iters: int = 20, metric: str = "cosine", seed: int = 0, impl: str = "auto"):
    """k-means of (N, d) points into ``k`` clusters.

    k-means++ seeding from ``seed``, then Lloyd iterations (stopping early at a fixed point).
    ``metric="cosine"`` is spherical k-means (unit centroids); ``"l2"`` is Euclidean. Returns
    (k, d) centroids in the points' dtype and (N,) int64 assignments.
    """
    check_float(points, "points")
    if points.dim() != 2:
        raise ValueError(f"points must have shape (N, d), got {tuple(points.shape)}")
    k = check_int(k, "k", low=1, high=max(1, points.shape[0]))
    if points.shape[0] == 0:
        raise ValueError("points is empty: k-means needs at least one point")
    if points.shape[1] == 0:
        raise ValueError("points have d=0: vectors need at least one component")
    check_finite(points, "points")
    iters = check_int(iters, "iters", low=0)
    seed = check_int(seed, "seed")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    pts = _prepare(points, metric)
    centroids = _seed_kmeans_pp(pts, k, metric, torch.Generator().manual_seed(seed))
    labels = _labels(pts, centroids, metric, impl)
    for _ in range(iters):
        centroids = _update(pts, labels, centroids, metric, impl)
        new_labels = _labels(pts, centroids, metric, impl)
        if torch.equal(new_labels, labels):  # a fixed point: further iterations change nothing
            break
        labels = new_labels
    return centroids.to(points.dtype), labels
