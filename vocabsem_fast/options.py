"""Option bundles that travel together through the ops and backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Similarity:
    """How a score between a row and a basis is formed: ``scale * cos`` (or ``scale * dot``)."""

    scale: float = 1.0
    normalize: bool = True
    eps: float = 1e-8


@dataclass(frozen=True)
class CrossEntropy:
    """The loss options of ``F.cross_entropy`` that the fused loss supports."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
