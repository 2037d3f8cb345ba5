"""The NaN and overflow contract of the similarity ops, as checks any backend's tests call (the
CPU backends in test_numerical_edges.py, the GPU ones in gpu_backend_cases.py).

NaN scores rank above every number, as in ``torch.topk``: a row with a NaN entry gets NaN values
first and valid, distinct indices; a basis with a NaN entry is every row's first pick. A row or
basis whose norm overflows (fp32 entries near 1e30) has inverse norm 0 and scores 0, as
``F.normalize`` makes it, never NaN from an overflowed raw product."""

from __future__ import annotations

import torch

import vocabsem_fast as vf
from vocabsem_fast import reference as ref

from helpers import assert_close, leaf


def nan_inputs(device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 16, generator=g).to(device, dtype)
    bases = torch.randn(300, 16, generator=g).to(device, dtype)
    hidden[4, 7] = float("nan")
    bases[123, 2] = float("nan")
    return hidden, bases


def check_nan_topk(impl: str, device: str, k: int) -> None:
    hidden, bases = nan_inputs(device)
    values, indices = vf.similarity_topk(hidden, bases, k, scale=5.0, impl=impl)
    expected, expected_indices = ref.similarity_topk(hidden, bases, k, scale=5.0)
    values, indices = values.cpu(), indices.cpu()
    assert bool(torch.isnan(values[4]).all()), "the NaN row: NaN values"
    assert sorted(indices[4].tolist()) == sorted(set(indices[4].tolist())) and bool((indices[4] >= 0).all()) \
        and bool((indices[4] < 300).all()), f"the NaN row needs valid, distinct indices: {indices[4].tolist()}"
    others = [r for r in range(9) if r != 4]
    assert bool((indices[others, 0] == 123).all()), "the NaN basis is every other row's first pick"
    assert bool(torch.isnan(values[others, 0]).all())
    assert torch.equal(indices[others, 1:], expected_indices.cpu()[others, 1:])
    assert_close(values[others, 1:], expected.cpu()[others, 1:], rtol=1e-5, atol=1e-5, name="the finite values")


def check_nan_hard_assignment(impl: str, device: str) -> None:
    hidden, bases = nan_inputs(device)
    indices, scores = vf.assign(hidden, bases[:40], hard=True, impl=impl)
    batched, _ = vf.assign(hidden[None], bases[None, :200], hard=True, impl=impl)
    assert bool((indices.cpu()[[r for r in range(9) if r != 4]] != -1).all())
    assert 0 <= int(indices[4]) < 40 and 0 <= int(batched[0, 4]) < 200
    assert bool((batched.cpu()[0, [r for r in range(9) if r != 4]] == 123).all())


def overflowing_inputs(device: str):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 12, generator=g, dtype=torch.float64)
    bases = torch.randn(33, 12, generator=g, dtype=torch.float64)
    hidden[[1, 5]] *= 1e30  # norms beyond float32: inverse norm 0
    bases[[0, 17, 32]] *= 1e30
    return hidden.float().to(device), bases.float().to(device)


def check_overflow_scores_zero(impl: str, device: str, strip_plan: str = "auto") -> None:
    from vocabsem_fast.backends.tiles import tile_config

    hidden, bases = overflowing_inputs(device)
    targets = torch.tensor([0, 3, -100, 17, 5, 32, 9], device=device)
    h, b = leaf(hidden), leaf(bases)
    rh, rb = leaf(hidden), leaf(bases)
    with tile_config(strip_plan=strip_plan):
        loss = vf.similarity_cross_entropy(h, b, targets, scale=7.0, label_smoothing=0.1, impl=impl)
        loss.backward()
    expected = ref.similarity_cross_entropy(rh, rb, targets, scale=7.0, label_smoothing=0.1)
    expected.backward()
    for name, actual, want in (("loss", loss, expected), ("hidden grad", h.grad, rh.grad),
                               ("bases grad", b.grad, rb.grad)):
        assert bool(torch.isfinite(actual).all()), f"{name}: not finite"
        assert_close(actual.cpu(), want.cpu(), rtol=1e-4, atol=1e-5, name=name)
    values, indices = vf.similarity_topk(hidden, bases, 3, scale=7.0, impl=impl)
    assert_close(values.cpu(), ref.similarity_topk(hidden, bases, 3, scale=7.0)[0].cpu(), rtol=1e-4, atol=1e-5,
                 name="top-k values")
    for r, row in enumerate(indices.cpu().tolist()):  # rows 1 and 5 score 0 everywhere: still 3 columns
        assert len(set(row)) == 3 and all(0 <= j < 33 for j in row), f"top-k row {r}: indices {row}"
    probs = vf.assign(hidden[None], bases[None, :9], temperature=0.5, impl=impl)
    assert_close(probs.cpu(), ref.assign(hidden[None], bases[None, :9], temperature=0.5).cpu(), rtol=1e-4,
                 atol=1e-5, name="soft assignment")


def check_infinite_entries(impl: str, device: str) -> None:
    """An infinite entry normalises its row to NaN (x / |x| = inf / inf): the loss of a hidden row
    holding one is NaN, and a basis holding one makes every row's loss NaN, as in the reference;
    gradients are NaN in the same rows; top-k values of such a row are NaN. The other rows of a
    hidden-only case stay finite and match."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(6, 10, generator=g)
    bases = torch.randn(45, 10, generator=g)
    targets = torch.tensor([3, 0, 44, 7, -100, 12])
    hidden[1, 4] = float("inf")
    hidden[3, 0] = float("-inf")
    for case, (h0, b0) in {"hidden rows": (hidden, bases), "a basis": (hidden.nan_to_num(posinf=1.0, neginf=-1.0),
                                                                       _with(bases, (20, 5), float("-inf")))}.items():
        got, want = {}, {}
        for _name, out, fn in (("fused", got, lambda x, y: vf.similarity_cross_entropy(
                x, y, targets.to(device), scale=5.0, reduction="none", impl=impl)),
                ("reference", want, lambda x, y: ref.similarity_cross_entropy(x, y, targets.to(device), scale=5.0,
                                                                             reduction="none"))):
            h, b = leaf(h0.to(device)), leaf(b0.to(device))
            loss = fn(h, b)
            loss.sum().backward()
            out.update(loss=loss.detach().cpu(), dh=h.grad.cpu(), db=b.grad.cpu())
        for part in ("loss", "dh", "db"):
            nan_got = got[part].isnan() if part == "loss" else got[part].isnan().any(-1)
            nan_want = want[part].isnan() if part == "loss" else want[part].isnan().any(-1)
            assert torch.equal(nan_got, nan_want), f"{impl} {case} {part}: NaN at {nan_got.tolist()}, " \
                                                   f"the reference at {nan_want.tolist()}"
        finite = ~want["loss"].isnan()
        assert_close(got["loss"][finite], want["loss"][finite], rtol=1e-4, atol=1e-5, name=f"{case}: finite rows")
    values, indices = vf.similarity_topk(hidden.to(device), bases.to(device), 4, scale=5.0, impl=impl)
    values = values.cpu()
    assert bool(values[[1, 3]].isnan().all()), f"{impl}: top-k of rows holding inf must be NaN, got {values[[1, 3]]}"
    assert bool(values[[0, 2, 4, 5]].isfinite().all())
    assert all(len(set(row)) == 4 for row in indices.cpu().tolist()), "top-k indices repeat"


def _with(x, at, value):
    x = x.clone()
    x[at] = value
    return x
