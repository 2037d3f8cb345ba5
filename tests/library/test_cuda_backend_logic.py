"""The cuda backend's orchestration (strips, GEMMs, where the norm factors go, the gradient
swap between the two products) checked on the CPU against the chunked algorithm, with a torch
model of each CUDA kernel written from its contract in csrc/cuda/similarity.h.

This does not run the CUDA kernels: they are checked on a GPU by bench/gpu_check.py (the generic
operator tests, parametrised over every available backend, then include "cuda")."""

from __future__ import annotations

import pytest
import torch

from vocabsem_fast.backends import cuda as cuda_module
from vocabsem_fast.backends.chunked import TorchBackend
from vocabsem_fast.backends.cuda import CudaBackend
from vocabsem_fast.options import LossOptions, SimilarityOptions

from helpers import assert_matches, make, make_targets


def _f(x, n):
    return torch.ones(n) if x is None else x


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
        return scores * scale * _f(row_inv, scores.shape[0])[:, None] * _f(col_inv, scores.shape[1])[None, :]

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
            taken = min(k, c1 - c0)
            if taken > 0:
                best, where = z[:, c0:c1].topk(taken, dim=1)
                values[s, :, :taken], indices[s, :, :taken] = best, where + c0
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
def test_vocabulary_splits_give_every_sm_a_block(rows, cols, sms):
    splits = cuda_module.vocabulary_splits(rows, cols, sms)
    assert rows * splits >= sms
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
