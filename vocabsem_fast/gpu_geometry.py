"""Launch geometry shared by the GPU backends and the Triton kernels: the SM count, and how many
vocabulary splits a few rows take so that the programs finish soonest.

Plain functions of sizes (no GPU needed), so the tests check them at every shape."""

from __future__ import annotations

import functools

import torch

H200_SMS = 132  # the SM count assumed where no GPU is asked (the interpreter, tests of the geometry)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H200's 132 where there is no GPU to ask)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H200_SMS


def finish_time(rows: int, units: int, splits: int, sms: int) -> int:
    """Work units the busiest SM runs when each of ``rows`` rows is cut into ``splits`` programs
    of at most ceil(units / splits) units, one program per SM at a time: waves x units per program."""
    per_program = -(-units // splits)
    programs = rows * -(-units // per_program)
    return -(-programs // sms) * per_program


@functools.lru_cache(maxsize=4096)
def balanced_splits(rows: int, units: int, sms: int, max_splits: int | None = None) -> int:
    """How many splits of ``units`` work units (vocabulary blocks or columns) each of ``rows``
    rows takes: the count whose programs finish soonest (``finish_time``), the fewest among
    equals, never more than fill one wave with the rows (ceil(sms / rows)), nor ``max_splits``.

    Rounding up to "at least one program per SM" overshoots: 134 programs on 132 SMs give two SMs
    a second program and double the time; 126 programs of one more unit each finish first. The
    returned count is that of the non-empty splits: ceil(units / ceil(units / splits))."""
    rows, units = max(rows, 1), max(units, 1)
    limit = max(1, min(units, -(-sms // rows), max_splits or units))
    best, best_time = 1, finish_time(rows, units, 1, sms)
    for splits in range(2, limit + 1):
        time = finish_time(rows, units, splits, sms)
        if time < best_time:
            best, best_time = splits, time
    return -(-units // -(-units // best))
