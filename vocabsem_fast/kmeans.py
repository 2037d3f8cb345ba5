"""k-means on top of the fused hard assignment: the N x k distances are never held at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_float, check_int
from .ops import assign
from . import backends
from .reference import _centroids_from_sums, _kmeans_pp, _prepare_kmeans_points, _update_centroids

METRICS = ("cosine", "l2")


def _labels(points: Tensor, centroids: Tensor, metric: str, impl: str) -> Tensor:
    if metric == "cosine":  # points and centroids are unit vectors: the best dot product
        return assign(points, centroids, hard=True, normalize=False, impl=impl)[0]
    # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2): one more column turns it into a dot product
    ones = points.new_ones(points.shape[0], 1)
    half_sq = -0.5 * (centroids * centroids).sum(-1, keepdim=True)
    return assign(torch.cat([points, ones], 1), torch.cat([centroids, half_sq], 1), hard=True, normalize=False,
                  impl=impl)[0]


def _update(points: Tensor, labels: Tensor, centroids: Tensor, metric: str, impl: str) -> Tensor:
    """New centres; the cuda backend sums each cluster's points in one fused kernel."""
    if points.dtype != torch.float64 and backends.resolve(impl, points.device) == "cuda":
        sums, counts = backends.get("cuda").centroid_sums(points, labels, centroids.shape[0])
        return _centroids_from_sums(sums, counts, centroids, metric)
    return _update_centroids(points, labels, centroids, metric)


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
    iters = check_int(iters, "iters", low=0)
    seed = check_int(seed, "seed")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    pts = _prepare_kmeans_points(points, metric)
    centroids = _kmeans_pp(pts, k, metric, torch.Generator().manual_seed(seed))
    labels = _labels(pts, centroids, metric, impl)
    for _ in range(iters):
        centroids = _update(pts, labels, centroids, metric, impl)
        new_labels = _labels(pts, centroids, metric, impl)
        if torch.equal(new_labels, labels):  # a fixed point: further iterations change nothing
            break
        labels = new_labels
    return centroids.to(points.dtype), labels
