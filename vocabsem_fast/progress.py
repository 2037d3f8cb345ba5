"""Minimal progress reporting on stderr for the command line (one line per step, with timing)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def step(message: str, *, enabled: bool = True) -> Iterator[None]:
    """Print ``message ...`` before a step and ``done (1.2 s)`` after it."""
    if not enabled:
        yield
        return
    print(f"{message} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
