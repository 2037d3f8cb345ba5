"""Argument checks shared by the public functions.

Every check raises ``ValueError`` or ``TypeError`` naming the argument. They look at shapes,
dtypes and devices only (no host sync), so they run unchanged under ``torch.compile``; checks that
need the data (target ranges) run inside the ops.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x: Tensor, name: str) -> None:
    check_tensor(x, name)
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout} (call .to_dense() first)")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_finite(x: Tensor, name: str) -> None:
    """Data-dependent (a host sync): for the functions that cannot give a meaningful result with
    NaN or inf entries (a least-squares solve, k-means sampling), never the fused ops."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf entries")


def check_pair(hidden: Tensor, bases: Tensor, *, allow_empty: bool = False) -> None:
    """``hidden`` (..., d) against ``bases`` (V, d): dtypes, ranks, sizes and devices
    (``allow_empty``: V = 0, a vocabulary shard that holds no rows)."""
    check_float(hidden, "hidden")
    check_float(bases, "bases")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., d), got a 0-d tensor")
    if bases.dim() != 2:
        raise ValueError(f"bases must have shape (V, d), got shape {tuple(bases.shape)}")
    if bases.shape[0] == 0 and not allow_empty:
        raise ValueError("bases is empty: the vocabulary must have at least one row (V >= 1)")
    _check_compatible(hidden, bases, "hidden", "bases")


def check_assign_pair(points: Tensor, centroids: Tensor) -> None:
    """``points`` (N, d) with ``centroids`` (K, d), or batched (B, N, d) with (B, K, d)."""
    check_float(points, "points")
    check_float(centroids, "centroids")
    if points.dim() not in (2, 3) or centroids.dim() != points.dim():
        raise ValueError(
            "points and centroids must be (N, d) and (K, d), or batched (B, N, d) and (B, K, d); "
            f"got points {tuple(points.shape)} and centroids {tuple(centroids.shape)}"
        )
    if points.dim() == 3 and points.shape[0] != centroids.shape[0]:
        raise ValueError(
            f"points and centroids must have the same batch size, got {points.shape[0]} and {centroids.shape[0]}"
        )
    if centroids.shape[-2] == 0:
        raise ValueError("centroids is empty: there must be at least one centroid (K >= 1)")
    _check_compatible(points, centroids, "points", "centroids")


def _check_compatible(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"hidden size mismatch: {a_name} has d={a.shape[-1]} but {b_name} has d={b.shape[-1]}")
    if a.shape[-1] == 0:
        raise ValueError(f"{a_name} and {b_name} have d=0: vectors need at least one component")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")
    check_same_device(**{a_name: a, b_name: b})


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def check_targets(targets, hidden: Tensor) -> None:
    check_tensor(targets, "targets")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 token ids), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    check_same_device(hidden=hidden, targets=targets)


def check_number(value, name: str, *, positive: bool = False, low: float | None = None,
                 high: float | None = None) -> float:
    """A finite real number (an int too large for a float, NaN and +-inf are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got an int too large for a float") from None
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if value in (math.inf, -math.inf):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}" if high is None else
                         f"{name} must lie in [{low}, {high}], got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def check_class_weight(weight, bases: Tensor) -> None:
    """Per-class weights: a floating (V,) tensor on the bases' device."""
    check_float(weight, "weight")
    if tuple(weight.shape) != (bases.shape[0],):
        raise ValueError(f"weight must have shape (V,) = ({bases.shape[0]},), got {tuple(weight.shape)}")
    check_same_device(bases=bases, weight=weight)


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def debug_checks_enabled() -> bool:
    """``VOCABSEM_DEBUG=1``: data checks always run on the host and name what they found (over
    ``VOCABSEM_SYNC_FREE``), and the cross-rank consistency check is on by default."""
    return os.environ.get("VOCABSEM_DEBUG", "0") not in ("", "0")


def sync_free_requested() -> bool:
    """``VOCABSEM_SYNC_FREE=1``: the ops never wait for the device to check data; the target range
    becomes an assertion on the device (it fails at the stream's next sync, as a CUDA error)."""
    return os.environ.get("VOCABSEM_SYNC_FREE", "0") not in ("", "0")


def host_reads_are_free(x: Tensor) -> bool:
    """Whether reading ``x``'s values on the host costs only the read: on the CPU. On an
    accelerator it waits for every queued kernel (the tests count such reads with this answering
    False)."""
    return x.device.type == "cpu"


def _capturing(x: Tensor) -> bool:
    """A CUDA graph is being captured on the current stream (``torch.compile(mode="reduce-overhead")``,
    ``torch.cuda.graph``): a host read would break the capture."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_target_range(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Data-dependent: every target is ignore_index or in [0, V). Runs inside the ops, as a
    ``ValueError`` naming the first bad target: free on the CPU, one small host read on a GPU.
    Where that read must not happen (a CUDA graph being captured, or ``VOCABSEM_SYNC_FREE=1``
    without ``VOCABSEM_DEBUG=1``) it is an assertion on the device instead."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    rule = f"targets must lie in [0, V={vocab_size}) or equal ignore_index={ignore_index}"
    on_device = not host_reads_are_free(targets) and not debug_checks_enabled() and (
        sync_free_requested() or _capturing(targets))
    if on_device:
        torch._assert_async(~bad.any(), f"{rule} (VOCABSEM_DEBUG=1 checks on the host and names the value)")
        return
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"{rule}; found {first}")
