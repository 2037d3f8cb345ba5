"""Work-tile bounds of the chunked algorithm and of the CPU strips.

The bounds are a frozen value read through a context variable: ``tile_config(...)`` sets other
bounds for the calls made inside it (tests use tiny tiles to exercise many chunks and strips;
a tuning run can try larger ones) and restores the previous value on exit, per thread and task.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    max_rows: int = 4096            # rows of hidden states in one block of the chunked algorithm
    max_elements: int = 1 << 22     # scores in one tile: 16 MiB of float32
    min_columns: int = 16           # narrowest column chunk
    # the strip algorithm's plan when gradients are wanted: "rows" (three GEMMs, a (V, d)
    # accumulator), "columns" (four GEMMs, a bounded workspace) or "auto" (rows when they fit
    # the workspace, see strips.choose_plan)
    strip_plan: str = "auto"


_DEFAULT = TileConfig()  # frozen: a shared default is safe
_CURRENT: contextvars.ContextVar[TileConfig] = contextvars.ContextVar("vocabsem_tiles", default=_DEFAULT)


def current_tiles() -> TileConfig:
    return _CURRENT.get()


@contextlib.contextmanager
def tile_config(**overrides) -> Iterator[TileConfig]:
    """Run the enclosed calls with these tile bounds (fields of ``TileConfig``)."""
    plan = overrides.get("strip_plan", "auto")
    if plan not in ("auto", "rows", "columns"):
        raise ValueError(f"strip_plan must be 'auto', 'rows' or 'columns', got {plan!r}")
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **overrides))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
