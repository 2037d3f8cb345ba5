"""assign (soft and hard, 2-D and batched) and kmeans against ``vocabsem_fast.reference``, for every
available backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends.tiles import tile_config

from helpers import BACKENDS, assert_error_bound, assert_matches, leaf, make, tiles

FP32_TOL = 2e-5

# (points shape, centroids shape): 2-D (N, d) / (K, d) and batched (B, N, d) / (B, K, d).
SOFT_SHAPES = {
    "N0-K7-d59": ((0, 59), (7, 59)),
    "N1-K1-d3": ((1, 3), (1, 3)),
    "N37-K7-d130": ((37, 130), (7, 130)),
    "N37-K1025-d59": ((37, 59), (1025, 59)),
    "B3-N37-K7-d130": ((3, 37, 130), (3, 7, 130)),
    "B2-N0-K5-d59": ((2, 0, 59), (2, 5, 59)),
    "B0-N4-K3-d5": ((0, 4, 5), (0, 3, 5)),
}

HARD_SHAPES = {
    **SOFT_SHAPES,
    "N5-K50257-d7": ((5, 7), (50257, 7)),
    "B2-N9-K1025-d59": ((2, 9, 59), (2, 1025, 59)),
}


def _pair(shapes, dtype=torch.float32, requires_grad=False):
    p_shape, c_shape = shapes
    return make(*p_shape, dtype=dtype, requires_grad=requires_grad), make(*c_shape, dtype=dtype,
                                                                          requires_grad=requires_grad)


# --- soft assignment ------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("temperature", [1.0, 0.07])
@pytest.mark.parametrize("shapes", SOFT_SHAPES.values(), ids=SOFT_SHAPES.keys())
@pytest.mark.parametrize("impl", BACKENDS)
def test_soft_assign_matches_reference(impl, shapes, temperature, normalize):
    points, centroids = _pair(shapes, requires_grad=True)
    rp, rc = leaf(points), leaf(centroids)
    probs = vf.assign(points, centroids, temperature=temperature, normalize=normalize, impl=impl)
    expected = ref.assign(rp, rc, temperature=temperature, normalize=normalize)
    assert probs.dtype == torch.float32
    assert probs.shape == (*points.shape[:-1], centroids.shape[-2])
    assert_matches(probs, expected, tol=FP32_TOL, name="soft assignments")
    if probs.numel():
        assert_matches(probs.sum(-1), torch.ones(probs.shape[:-1]), tol=1e-5, name="row sums")
    upstream = torch.randn_like(expected)
    (probs * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert_matches(points.grad, rp.grad, tol=FP32_TOL, name="points.grad")
    assert_matches(centroids.grad, rc.grad, tol=FP32_TOL, name="centroids.grad")


@pytest.mark.parametrize("which", ["points", "centroids"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_soft_assign_gradient_of_one_input_only(impl, batched, which):
    shapes = SOFT_SHAPES["B3-N37-K7-d130" if batched else "N37-K7-d130"]
    points, centroids = _pair(shapes)
    (points if which == "points" else centroids).requires_grad_(True)
    rp, rc = leaf(points), leaf(centroids)
    probs = vf.assign(points, centroids, temperature=0.5, impl=impl)
    expected = ref.assign(rp, rc, temperature=0.5)
    upstream = torch.randn_like(expected)
    (probs * upstream).sum().backward()
    (expected * upstream).sum().backward()
    wanted, other, expected_grad = (points, centroids, rp.grad) if which == "points" else (centroids, points, rc.grad)
    assert other.grad is None
    assert_matches(wanted.grad, expected_grad, tol=FP32_TOL, name=f"{which}.grad")


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_gradcheck_soft_assign(impl, batched, normalize):
    lead = (2,) if batched else ()
    points = make(*lead, 4, 6, dtype=torch.float64, requires_grad=True)
    centroids = make(*lead, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, c: vf.assign(p, c, temperature=0.5, normalize=normalize, impl=impl), (points, centroids),
        eps=1e-6, atol=1e-5, rtol=1e-4,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_soft_assign_low_precision(impl, batched, dtype):
    shapes = SOFT_SHAPES["B3-N37-K7-d130" if batched else "N37-K1025-d59"]
    points, centroids = _pair(shapes, dtype=dtype)
    results = []
    for cast, run in ((dtype, lambda p, c: vf.assign(p, c, temperature=0.1, impl=impl)),
                      (dtype, lambda p, c: ref.assign(p, c, temperature=0.1)),
                      (torch.float64, lambda p, c: ref.assign(p, c, temperature=0.1))):
        p, c = leaf(points, cast), leaf(centroids, cast)
        out = run(p, c)
        if not results:
            upstream = torch.randn(out.shape, dtype=torch.float64)
        (out.double() * upstream).sum().backward()
        results.append((out, p.grad, c.grad))
    (out, dp, dc), (ref_out, ref_dp, ref_dc), (truth, truth_dp, truth_dc) = results
    assert out.dtype == torch.float32, "soft assignments are float32 for low-precision inputs"
    assert dp.dtype == dtype and dc.dtype == dtype, "gradients come back in the input dtype"
    assert_error_bound(out, ref_out, truth, name="soft assignments")
    assert_error_bound(dp, ref_dp, truth_dp, name="points.grad")
    assert_error_bound(dc, ref_dc, truth_dc, name="centroids.grad")


# --- hard assignment ------------------------------------------------------------------------------
def _scores64(points, centroids, normalize):
    """The float64 truth of the scores (..., N, K)."""
    p, c = points.double(), centroids.double()
    if normalize:
        p, c = F.normalize(p, dim=-1, eps=1e-8), F.normalize(c, dim=-1, eps=1e-8)
    return p @ c.transpose(-1, -2)


def _hard_params():
    params = []
    for shape_id, shapes in HARD_SHAPES.items():
        for tile in ("default", "tiny", "ragged"):
            if tile == "ragged" and shapes[1][-2] > 2048:
                continue
            params.append(pytest.param(tile, shapes, id=f"{tile}-{shape_id}"))
    return params


@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("tile,shapes", _hard_params())
@pytest.mark.parametrize("impl", BACKENDS)
def test_hard_assign_matches_reference(impl, tile, shapes, normalize):
    points, centroids = _pair(shapes)
    with tiles(tile):
        indices, scores = vf.assign(points, centroids, hard=True, normalize=normalize, impl=impl)
    expected_indices, expected_scores = ref.assign(points, centroids, hard=True, normalize=normalize)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == scores.shape == points.shape[:-1]
    assert_matches(scores, expected_scores, tol=FP32_TOL, name="best scores")
    if not indices.numel():
        return
    # The float64 score at the returned index is the returned score (whatever a tie picked) ...
    truth = _scores64(points, centroids, normalize)
    assert_matches(scores, truth.gather(-1, indices[..., None])[..., 0], tol=FP32_TOL, name="score at index")
    # ... and where the best centroid is clear of the runner-up, the index is the reference's.
    if truth.shape[-1] > 1:
        top2 = truth.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4 * top2[..., 0].abs().clamp_min(1)
        assert bool(clear.any()), "no clear winner at all: the index comparison would test nothing"
    else:
        clear = torch.ones(indices.shape, dtype=torch.bool)
    mismatch = clear & (indices != expected_indices)
    assert not bool(mismatch.any()), f"indices differ at {mismatch.nonzero()[:5].tolist()}"


# --- kmeans ---------------------------------------------------------------------------------------
def _blobs(k: int, per_blob: int, d: int, metric: str, dtype=torch.float32):
    """k well-separated clusters: directions at cosine < 0.9 from each other for "cosine" (with
    random lengths, which spherical k-means ignores), points far apart for "l2"."""
    while True:
        centres = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=-1)
        if k == 1 or (centres @ centres.T - 2 * torch.eye(k)).max() < 0.6:
            break
    labels = torch.arange(k).repeat_interleave(per_blob)
    # Tight blobs: k-means++ then seeds two centres in one blob with probability ~1e-5 (the
    # within-blob distance over the between-blob distance), so the blobs are always recovered.
    noise = 0.002 * torch.randn(k * per_blob, d, dtype=torch.float64)
    if metric == "cosine":
        points = (centres[labels] + noise) * (0.5 + torch.rand(k * per_blob, 1, dtype=torch.float64))
    else:
        points = 10.0 * centres[labels] + noise
    order = torch.randperm(k * per_blob)
    return points[order].to(dtype), labels[order]


@pytest.mark.parametrize("tile", ["default", "tiny"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_kmeans_matches_reference(impl, metric, tile):
    k, d = 6, 17
    points, true_labels = _blobs(k, 37, d, metric)
    seed = int(torch.randint(0, 2**31, ()).item())
    with tiles(tile):
        centroids, labels = vf.kmeans(points, k, iters=10, metric=metric, seed=seed, impl=impl)
    expected_centroids, expected_labels = ref.kmeans(points, k, iters=10, metric=metric, seed=seed)
    assert centroids.shape == (k, d) and centroids.dtype == points.dtype
    assert labels.shape == (points.shape[0],) and labels.dtype == torch.int64
    assert torch.equal(labels, expected_labels), "assignments differ from reference.kmeans with the same seed"
    assert_matches(centroids, expected_centroids, tol=1e-5, name="centroids")
    if metric == "cosine":
        assert_matches(centroids.norm(dim=-1), torch.ones(k), tol=1e-5, name="spherical centroids are unit")
    # Well-separated blobs are recovered exactly: each blob is one cluster, up to relabelling.
    pairs = torch.unique(torch.stack([true_labels, labels]), dim=1)
    assert pairs.shape[1] == k, f"clusters do not match the blobs: {pairs.tolist()}"


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_kmeans_iterations_match_reference(impl, metric):
    """Unstructured float64 data, where Lloyd's iterations move the centres for a while: the
    iterates, the stopping point and the result are the reference's (float64 makes a near-tie
    between a point's two nearest centres, which could flip an argmin, vanishingly unlikely)."""
    points = make(300, 4, dtype=torch.float64)
    seed = int(torch.randint(0, 2**31, ()).item())
    seeded = ref.kmeans(points, 8, iters=0, metric=metric, seed=seed)
    for iters in (1, 3, 50):
        centroids, labels = vf.kmeans(points, 8, iters=iters, metric=metric, seed=seed, impl=impl)
        expected_centroids, expected_labels = ref.kmeans(points, 8, iters=iters, metric=metric, seed=seed)
        assert torch.equal(labels, expected_labels), f"iters={iters}: assignments differ"
        assert_matches(centroids, expected_centroids, tol=1e-12, name=f"iters={iters}: centroids")
    assert not torch.equal(labels, seeded[1]), "the iterations changed nothing: the test would prove little"


@pytest.mark.parametrize("impl", BACKENDS)
def test_kmeans_edge_cases(impl):
    points, _ = _blobs(3, 5, 4, "l2", dtype=torch.float64)
    # k = N: every point its own cluster; k = 1: one cluster, the mean; iters = 0: the seeding.
    centroids, labels = vf.kmeans(points, 15, metric="l2", impl=impl)
    assert torch.equal(labels.sort().values, torch.arange(15))
    centroids, labels = vf.kmeans(points, 1, metric="l2", impl=impl)
    assert centroids.dtype == torch.float64 and bool((labels == 0).all())
    assert_matches(centroids[0], points.mean(0), tol=1e-12, name="single centroid")
    for metric in ("cosine", "l2"):
        got = vf.kmeans(points, 3, iters=0, metric=metric, seed=5, impl=impl)
        expected = ref.kmeans(points, 3, iters=0, metric=metric, seed=5)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@pytest.mark.parametrize("impl", BACKENDS)
def test_hard_assign_tiny_tiles_agree_with_one_tile(impl):
    """Hard assignment over K = 50257 centroids in 3142 column chunks and 5 row blocks agrees with
    the one-tile result (the running argmax carried across chunks)."""
    points, centroids = make(19, 7), make(50257, 7)
    with tile_config(max_elements=256, max_rows=4, min_columns=16):
        indices, scores = vf.assign(points, centroids, hard=True, impl=impl)
    full_indices, full_scores = vf.assign(points, centroids, hard=True, impl=impl)
    assert_matches(scores, full_scores, tol=1e-6, name="scores")
    assert_matches(scores, ref.assign(points, centroids, hard=True)[1], tol=FP32_TOL, name="scores vs reference")
    truth = _scores64(points, centroids, True)
    assert_matches(scores, truth.gather(-1, indices[:, None])[:, 0], tol=FP32_TOL, name="score at index")
