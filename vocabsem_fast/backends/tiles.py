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


_DEFAULT = TileConfig()  # frozen: a shared default is safe
_CURRENT: contextvars.ContextVar[TileConfig] = contextvars.ContextVar("vocabsem_tiles", default=_DEFAULT)


def current_tiles() -> TileConfig:
    return _CURRENT.get()


@contextlib.contextmanager
def tile_config(**overrides) -> Iterator[TileConfig]:
    """Run the enclosed calls with these tile bounds (fields of ``TileConfig``)."""
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **overrides))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
