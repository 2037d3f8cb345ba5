"""Shared test helpers: backends and tile configurations to parametrize over, input factories,
an ``assert_close`` that says where a mismatch is, and the low-precision error bound."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

import vocabsem_fast
from vocabsem_fast.backends import TRITON_INTERPRETING
from vocabsem_fast.backends.tiles import tile_config

# The backends that run on the CPU tensors these tests make, from the registry at collection
# time (triton only under its interpreter). The GPU backends are checked on CUDA tensors by
# gpu_backend_cases.py.
BACKENDS = [name for name in vocabsem_fast.available_backends()
            if name in ("cpu", "torch") or (name == "triton" and TRITON_INTERPRETING)]

# "default": one tile covers every test shape. "tiny": many column chunks and row blocks
# (V = 1025 in 9 chunks of 128 per block of 8 rows). "ragged": widths that divide nothing
# (33 columns, 3 rows), so the last chunk and the last row block are partial.
TILES = {
    "default": None,
    "tiny": dict(max_elements=64 * 16, max_rows=8, min_columns=16),
    "ragged": dict(max_elements=100, max_rows=3, min_columns=5),
}


def tiles(name: str):
    """Context manager applying the named tile configuration (a no-op for "default")."""
    overrides = TILES[name]
    return contextlib.nullcontext() if overrides is None else tile_config(**overrides)


def make(*shape: int, dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Tensor:
    """Fresh standard-normal inputs (the seed fixture in conftest makes each run different)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def leaf(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A detached copy of ``x`` (optionally cast) that requires grad, for a second backward pass."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def make_targets(shape: tuple[int, ...], vocab: int, *, ignore_index: int = -100, ignored: float = 0.25) -> Tensor:
    """int64 targets in [0, vocab), about a fraction ``ignored`` of them set to ``ignore_index``."""
    targets = torch.randint(0, vocab, shape)
    mask = torch.rand(shape) < ignored
    return torch.where(mask, torch.full_like(targets, ignore_index), targets)


def _describe(actual: Tensor, expected: Tensor, bad: Tensor, limit: int = 5) -> str:
    where = bad.nonzero()
    lines = [f"{int(bad.sum())} of {bad.numel()} elements differ; shape {tuple(actual.shape)}"]
    for idx in where[:limit].tolist():
        idx = tuple(idx)
        lines.append(f"  at {idx}: actual {actual[idx].item()!r} expected {expected[idx].item()!r}")
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    if worst:
        worst = tuple(int(i) for i in worst)
        lines.append(
            f"  worst at {worst}: actual {actual[worst].item()!r} expected {expected[worst].item()!r}"
            f" (|diff| {diff[worst].item():.3e})"
        )
    return "\n".join(lines)


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, name: str = "") -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` (NaN equal to NaN), with
    the first mismatches and the worst one in the message. Shapes must agree exactly."""
    assert isinstance(actual, Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not bool(ok.all()):
        raise AssertionError(f"{name} mismatch (rtol={rtol}, atol={atol}):\n" + _describe(a, e, ~ok))


def assert_matches(actual: Tensor, expected: Tensor, *, tol: float, name: str = "") -> None:
    """``assert_close`` with a tolerance relative to the magnitude of ``expected``: every element
    within ``tol * max(1, max|expected|)``. Suits sums whose size grows with N, V or the scale."""
    magnitude = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual, expected, rtol=tol, atol=tol * magnitude, name=name)


def max_error(x: Tensor, truth: Tensor) -> float:
    return (x.detach().double() - truth.detach().double()).abs().max().item() if truth.numel() else 0.0


def assert_error_bound(out: Tensor, ref: Tensor, truth: Tensor, *, name: str, factor: float = 2.0,
                       slack: float = 1e-3) -> None:
    """The backend's error against a float64 ``truth`` is at most ``factor`` times the reference's
    own error in the same dtype, plus ``slack * max(1, max|truth|)`` (flash-attention / CCE style)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite values in the backend's output"
    err, ref_err = max_error(out, truth), max_error(ref, truth)
    if math.isnan(ref_err):  # the reference itself broke down in this dtype (e.g. fp16 overflow of
        ref_err = 0.0        # 1/|x| for a tiny row): hold the backend to the slack alone
    magnitude = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    bound = factor * ref_err + slack * magnitude
    assert err <= bound, (
        f"{name}: backend error {err:.3e} > {factor} x reference error {ref_err:.3e} + slack "
        f"{slack * magnitude:.3e}\n" + _describe(out.detach().double(), truth.double(),
                                                  (out.detach().double() - truth).abs() > bound)
    )


def grads(*tensors: Tensor) -> list[Tensor | None]:
    return [t.grad for t in tensors]


# (leading dims, d, V): odd sizes from the contract's test practice. V = 50257 only with small N
# and d, and never with the "ragged" tiles (thousands of Python-level tiles would add nothing).
SHAPES = {
    "N0-d59-V7": ((0,), 59, 7),
    "N1-d1-V1": ((1,), 1, 1),
    "N37-d59-V1025": ((37,), 59, 1025),
    "B3x5-d130-V7": ((3, 5), 130, 7),
    "N37-d130-V1025": ((37,), 130, 1025),
    "B0x5-d59-V1025": ((0, 5), 59, 1025),
    "N5-d59-V50257": ((5,), 59, 50257),
    "N2-d1-V50257": ((2,), 1, 50257),
}


def tile_shape_params(shapes=None, tile_names=("default", "tiny", "ragged")) -> list:
    """pytest params ``(tile, (lead, d, V))`` for every tile configuration and shape combination
    worth running."""
    import pytest  # noqa: PLC0415

    params = []
    for shape_id in shapes or SHAPES:
        lead, d, v = SHAPES[shape_id]
        for tile in tile_names:
            if tile == "ragged" and v > 2048:
                continue
            params.append(pytest.param(tile, (lead, d, v), id=f"{tile}-{shape_id}"))
    return params
