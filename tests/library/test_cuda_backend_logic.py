"""The cuda backend's orchestration (strips, GEMMs, where the norm factors go, the gradient
swap between the two products) checked on the CPU against the chunked algorithm, with a torch
model of each CUDA kernel written from its contract in csrc/cuda/similarity.h.

This does not run the CUDA kernels: they are checked on a GPU by bench/gpu_check.py (the generic
operator tests, parametrised over every available backend, then include "cuda")."""

from __future__ import annotations

import math

import pytest
import torch

from vocabsem_fast.backends import cuda as cuda_module
from vocabsem_fast.backends.chunked import TorchBackend
from vocabsem_fast.backends.cuda import CudaBackend
from vocabsem_fast.gpu_geometry import finish_time
from vocabsem_fast.options import LossOptions, SimilarityOptions

from helpers import assert_matches, make, make_targets


def _f(x, n):
    return torch.ones(n) if x is None else x


def _ranks_above(a: float, b: float) -> bool:
    return (math.isnan(a) and not math.isnan(b)) or a > b


def _same_rank(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def topk_rounds(row: list[float], begin: int, end: int, k: int) -> list[tuple[float, int]]:
    """topk_partial_kernel's selection loop, line for line, one thread: each round takes the best
    entry of [begin, end) that ranks after the previous round's pick (value descending, NaN
    first, ties by ascending index); nothing is marked in the scores."""
    picks: list[tuple[float, int]] = []
    last, last_index = math.nan, -1
    for _ in range(k):
        value, index = -math.inf, None
        for j in range(begin, end):
            z = row[j]
            after_last = _ranks_above(last, z) or (_same_rank(last, z) and j > last_index)
            if after_last and (_ranks_above(z, value) or (_same_rank(z, value) and (index is None or j < index))):
                value, index = z, j
        if index is None:
            break
        picks.append((value, index))
        last, last_index = value, index
    return picks


class KernelModel:
    """The contract of each launcher in similarity.h, in torch (fp32 tiles, in-place where the
    kernel works in place)."""

    cuda_max_topk = 64
    cuda_max_soft_assign_k = 64

    @staticmethod
    def cuda_row_inverse_norms(x, eps):
        inverse = 1.0 / torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(eps)
        return inverse.masked_fill(torch.isinf(x).any(dim=-1), float("nan"))

    @staticmethod
    def cuda_normalization_backward(x, inv, grad, eps, grad_times_inv):
        xf = x.float()
        y = xf * inv[:, None]
        passes = torch.linalg.vector_norm(xf, dim=-1) >= eps
        dot = torch.where(passes, (y * grad).sum(-1), 0.0)
        return (1.0 if grad_times_inv else inv[:, None]) * (grad - y * dot[:, None])

    @staticmethod
    def _z(scores, scale, row_inv, col_inv):
        """``scaled()``: a zero factor (an overflowed norm) gives 0 even where the raw score is inf."""
        factor = scale * _f(row_inv, scores.shape[0])[:, None] * _f(col_inv, scores.shape[1])[None, :]
        return torch.where(factor == 0, 0.0, scores * factor)

    @staticmethod
    def _ranges(cols, splits):
        span = -(-cols // splits)
        return [(s * span, min(cols, (s + 1) * span)) for s in range(splits)]

    def cuda_lse_partial(self, scores, scale, row_inv, col_inv, targets, smoothing, splits):
        z = self._z(scores, scale, row_inv, col_inv)
        rows, cols = z.shape
        partial = torch.zeros(4, splits, rows)
        partial[0] = float("-inf")
        for s, (c0, c1) in enumerate(self._ranges(cols, splits)):
            if c1 <= c0:
                continue
            part = z[:, c0:c1]
            m = part.amax(1)
            partial[0, s] = m
            partial[1, s] = (part - m[:, None]).exp().sum(1)
            in_range = (targets >= c0) & (targets < c1)
            partial[2, s] = torch.where(in_range, part.gather(1, (targets - c0).clamp(0, c1 - c0 - 1)[:, None])[:, 0],
                                        0.0)
            partial[3, s] = part.sum(1) if smoothing > 0 else 0.0
        return partial

    @staticmethod
    def cuda_lse_finish(partial, targets, ignore_index, smoothing, vocab):
        m = partial[0].amax(0)
        lse = m + torch.log((partial[1] * torch.exp(partial[0] - m)).sum(0))
        loss = lse - (1 - smoothing) * partial[2].sum(0) - (smoothing * partial[3].sum(0) / vocab if smoothing > 0
                                                             else 0.0)
        return lse, torch.where(targets == ignore_index, 0.0, loss)

    def cuda_softmax_grad_tile(self, scores, col0, scale, row_inv, col_inv, lse, targets, weight, smoothing, vocab,
                               col_mul):
        z = self._z(scores, scale, row_inv, col_inv)
        cols = torch.arange(col0, col0 + z.shape[1])
        g = torch.exp(z - lse[:, None]) - smoothing / vocab
        g = g - torch.where(cols[None, :] == targets[:, None], 1.0 - smoothing, 0.0)
        g = g * weight[:, None] * scale * _f(col_mul, z.shape[1])[None, :]
        scores.copy_(torch.where(weight[:, None] == 0, 0.0, g))

    def cuda_topk_partial(self, scores, scale, row_inv, col_inv, k, splits):
        z = self._z(scores, scale, row_inv, col_inv)
        rows, cols = z.shape
        values = torch.full((splits, rows, k), float("-inf"))
        indices = torch.full((splits, rows, k), -1, dtype=torch.long)
        for s, (c0, c1) in enumerate(self._ranges(cols, splits)):
            for r in range(rows):
                for slot, (value, j) in enumerate(topk_rounds(z[r].tolist(), c0, c1, k)):
                    values[s, r, slot], indices[s, r, slot] = value, j
        return values, indices

    def cuda_soft_assign_forward(self, points, centroids, inv_p, inv_c, scale):
        b, n, d = points.shape
        k = centroids.shape[1]
        pn = points.float() * _f(inv_p, b * n).view(b, n, 1)
        cn = centroids.float() * _f(inv_c, b * k).view(b, k, 1)
        return torch.softmax(torch.bmm(pn, cn.transpose(1, 2)) * scale, -1)

    def cuda_soft_assign_backward(self, points, centroids, inv_p, inv_c, scale, probs, grad):
        b, n, d = points.shape
        k = centroids.shape[1]
        pn = points.float() * _f(inv_p, b * n).view(b, n, 1)
        cn = centroids.float() * _f(inv_c, b * k).view(b, k, 1)
        gs = probs * (grad - (grad * probs).sum(-1, keepdim=True)) * scale
        return torch.bmm(gs, cn), torch.bmm(gs.transpose(1, 2), pn)

    @staticmethod
    def cuda_centroid_sums(points, labels, clusters):
        sums = torch.zeros(clusters, points.shape[1]).index_add_(0, labels, points.float())
        return sums, torch.bincount(labels, minlength=clusters).float()


@pytest.fixture
def backends_pair(monkeypatch):
    monkeypatch.setattr(cuda_module, "STRIP_ELEMENTS", 700)  # several strips of rows
    monkeypatch.setattr(cuda_module, "MIN_SPLIT_COLUMNS", 7)  # several vocabulary splits of these small tiles
    return CudaBackend(KernelModel()), TorchBackend()


@pytest.mark.parametrize("rows", [1, 8, 64, 2048])
@pytest.mark.parametrize("cols", [32000, 128256, 256000])
@pytest.mark.parametrize("sms", [132, 108])
def test_vocabulary_splits_fill_one_wave(rows, cols, sms):
    splits = cuda_module.vocabulary_splits(rows, cols, sms)
    if rows < sms:  # at most one block per SM, and as soon done as an even split over the SMs
        assert rows * splits <= sms
        assert finish_time(rows, cols, splits, sms) <= -(-cols // (sms // rows))
    assert -(-cols // splits) >= cuda_module.MIN_SPLIT_COLUMNS - 1 or splits == 1
    if rows >= sms:
        assert splits == 1


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_orchestration(backends_pair, normalize, reduction, smoothing, dtype):
    fused, chunked = backends_pair
    h, b = make(37, 19, dtype=dtype), make(101, 19, dtype=dtype)
    t = make_targets((37,), 101)
    sim, ce = SimilarityOptions(7.0 if normalize else 0.3, normalize), LossOptions(label_smoothing=smoothing)
    valid = t != ce.ignore_index
    weight = torch.where(valid, torch.rand(37) if reduction == "none" else torch.tensor(1.3), 0.0)
    in_forward = reduction != "none"  # a reduced loss: the gradients from the forward pass
    loss, lse, dh, db = fused.cross_entropy(h, b, t, sim, ce, weight if in_forward else None, True, True)
    ref_loss, ref_lse, _, _ = chunked.cross_entropy(h, b, t, sim, ce)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_matches(loss, ref_loss, tol=tol, name="loss")
    assert_matches(lse, ref_lse, tol=tol, name="lse")
    if not in_forward:  # gradients come from the backward pass
        assert dh is None and db is None
        dh, db = fused.cross_entropy_backward(weight, h, b, t, lse, sim, ce, True, True)
    ref_dh, ref_db = chunked.cross_entropy_backward(weight, h, b, t, ref_lse, sim, ce, True, True)
    assert_matches(dh.float(), ref_dh.float(), tol=tol, name="grad hidden")
    assert_matches(db.float(), ref_db.float(), tol=tol, name="grad bases")


@pytest.mark.parametrize("k", [1, 6])
def test_topk_orchestration(backends_pair, k):
    fused, chunked = backends_pair
    h, b = make(23, 11), make(97, 11)
    sim = SimilarityOptions(2.0, True)
    values, indices = fused.topk(h, b, k, sim)
    ref_values, _ = chunked.topk(h, b, k, sim)
    assert_matches(values, ref_values, tol=1e-5, name="top-k values")
    scores = chunked.logits(h, b, sim)
    assert_matches(scores.gather(1, indices), ref_values, tol=1e-5, name="scores at top-k indices")


def test_soft_assign_and_centroid_sums_orchestration(backends_pair):
    fused, chunked = backends_pair
    p, c = make(2, 13, 9, requires_grad=False), make(2, 5, 9)
    sim = SimilarityOptions(4.0, True)
    probs = fused.soft_assign(p, c, sim)
    assert_matches(probs, chunked.soft_assign(p, c, sim), tol=1e-5, name="probs")
    g = torch.randn_like(probs)
    for got, ref in zip(fused.soft_assign_backward(g, probs, p, c, sim, True, True),
                        chunked.soft_assign_backward(g, probs, p, c, sim, True, True)):
        assert_matches(got, ref, tol=1e-5, name="soft assign gradient")
    points, labels = make(50, 4), torch.randint(0, 7, (50,))
    sums, counts = fused.centroid_sums(points, labels, 7)
    for c_ in range(7):
        assert_matches(sums[c_], points[labels == c_].sum(0), tol=1e-6, name="sums")
        assert counts[c_] == (labels == c_).sum()


@pytest.mark.parametrize("normalize", [True, False])
def test_batched_hard_assignment_orchestration(backends_pair, normalize):
    fused, chunked = backends_pair
    points, centroids = make(3, 29, 11), make(3, 40, 11)
    sim = SimilarityOptions(1.0, normalize)
    indices, scores = fused.batched_argmax(points, centroids, sim)
    ref_indices, ref_scores = chunked.batched_argmax(points, centroids, sim)
    assert_matches(scores, ref_scores, tol=1e-5, name="scores")
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_rounds_take_each_entry_once(k):
    """All-equal scores (a zero scale factor makes a whole row 0), -inf and NaN entries: the
    selection takes distinct columns in torch.topk's order (NaN first, ties by index)."""
    rows = [[0.0] * 9, [float("-inf")] * 9, [1.0, float("nan"), 1.0, float("-inf"), 2.0, float("nan"), 0.0, 1.0, 0.0]]
    for row in rows:
        picks = topk_rounds(row, 0, 9, k)
        taken = [j for _, j in picks]
        assert len(taken) == k and len(set(taken)) == k, f"row {row}: took {taken}"
        expected = sorted(range(9), key=lambda j: (not math.isnan(row[j]), -row[j] if not math.isnan(row[j]) else 0, j))
        assert taken == expected[:k]
    assert topk_rounds([3.0, 1.0], 0, 2, 5) == [(3.0, 0), (1.0, 1)]  # a short range: fewer than k


def test_overflowing_rows_and_bases_orchestration(backends_pair):
    """Rows and bases whose norms overflow score 0 (never NaN from inf x 0): the loss, its
    gradients, top-k (distinct indices on the all-zero rows) and the batched hard assignment."""
    fused, chunked = backends_pair
    h, b = make(13, 9), make(60, 9)
    h[[2, 7]] *= 1e30
    b[[0, 33]] *= 1e30
    t = make_targets((13,), 60)
    sim = SimilarityOptions(5.0, True)
    loss, lse, _, _ = fused.cross_entropy(h, b, t, sim, LossOptions(), None, False, False)
    ref_loss, ref_lse, _, _ = chunked.cross_entropy(h, b, t, sim, LossOptions())
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(lse).all())
    assert_matches(loss, ref_loss, tol=1e-5, name="loss")
    values, indices = fused.topk(h, b, 5, sim)
    assert bool(torch.isfinite(values).all())
    for r in range(13):
        assert len(set(indices[r].tolist())) == 5, f"row {r}: repeated indices {indices[r].tolist()}"
    assert bool((values[[2, 7]] == 0).all())
    assert indices[2].tolist() == list(range(5))  # all scores 0: the first columns, as torch.topk's ties go
    hard, scores = fused.batched_argmax(h[None], b[None], sim)
    ref_hard, ref_scores = chunked.batched_argmax(h[None], b[None], sim)
    assert bool(torch.isfinite(scores).all())
    assert_matches(scores, ref_scores, tol=1e-5, name="batched hard scores")
