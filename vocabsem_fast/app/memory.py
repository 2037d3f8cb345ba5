"""Peak resident memory of a stretch of work in this process (Linux; None elsewhere).

glibc is asked to return freed memory at once, so that a stretch measured after another sees
its own pages, and the kernel's high-water mark (VmHWM) is reset to the current resident size at
the start of the stretch."""

from __future__ import annotations

import ctypes
from pathlib import Path


def release_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """VmHWM := the current resident size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """``with PeakMemory() as peak: ...``; then ``peak.mib`` (resident high-water mark) and
    ``peak.above_start_mib`` (what the stretch added), or None where /proc cannot tell."""

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        # the start is read after the reset, from the mark itself: pages freed between a reading
        # of VmRSS and the reset would otherwise put the peak below the start
        self.start_kib = _status_kib("VmHWM") if _reset_high_water_mark() else None
        self.mib = self.above_start_mib = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if peak is not None and self.start_kib is not None:
            self.mib = peak / 1024
            self.above_start_mib = (peak - self.start_kib) / 1024
