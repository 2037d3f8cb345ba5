"""Option bundles that travel together from the public functions through the ops to a backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SimilarityOptions:
    """How a score between a row and a basis is formed: ``scale * cos`` (or ``scale * dot``)."""

    scale: float = 1.0
    normalize: bool = True
    eps: float = 1e-8


@dataclass(frozen=True)
class LossOptions:
    """The options of ``F.cross_entropy`` that the fused loss supports, per row: which target is
    ignored and how much label smoothing (the reduction over rows happens above the backends)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
