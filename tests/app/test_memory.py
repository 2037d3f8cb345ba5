"""PeakMemory against a model of the kernel's counters (VmRSS, VmHWM and clear_refs)."""

import pytest

from vocabsem_fast.app import memory


class _Process:
    """Resident size that another thread keeps shrinking (``freeing`` KiB at every look at
    /proc) or growing, and the high-water mark that clear_refs resets to it."""

    def __init__(self, rss_kib: int, freeing: int):
        self.rss, self.hwm, self.freeing = rss_kib, rss_kib, freeing

    def tick(self) -> None:
        self.rss -= self.freeing
        self.hwm = max(self.hwm, self.rss)

    def path(self, process):
        class FakePath:
            def __init__(self, name):
                self.name = str(name)

            def read_text(self):
                process.tick()
                assert self.name == "/proc/self/status"
                return f"Name:\tpython\nVmHWM:\t{process.hwm} kB\nVmRSS:\t{process.rss} kB\n"

            def write_text(self, text):
                process.tick()
                assert self.name == "/proc/self/clear_refs" and text == "5"
                process.hwm = process.rss

        return FakePath


@pytest.mark.parametrize("freeing", [0, 64, 4096])
def test_memory_freed_meanwhile_never_makes_the_peak_negative(monkeypatch, freeing):
    process = _Process(500_000, freeing)
    monkeypatch.setattr(memory, "Path", process.path(process))
    monkeypatch.setattr(memory, "release_freed_memory", process.tick)
    with memory.PeakMemory() as peak:
        process.tick()
    assert peak.above_start_mib is not None and peak.above_start_mib >= 0
    assert peak.mib * 1024 <= 500_000


def test_what_the_stretch_adds_is_measured(monkeypatch):
    process = _Process(500_000, 0)
    monkeypatch.setattr(memory, "Path", process.path(process))
    monkeypatch.setattr(memory, "release_freed_memory", lambda: None)
    with memory.PeakMemory() as peak:
        process.rss += 10 * 1024
        process.tick()
        process.rss -= 10 * 1024  # freed again before the end: the peak still counts it
    assert peak.above_start_mib == pytest.approx(10.0)


def test_no_proc_gives_none(monkeypatch):
    class Missing:
        def __init__(self, name):
            pass

        def read_text(self):
            raise OSError("no /proc")

        def write_text(self, text):
            raise OSError("no /proc")

    monkeypatch.setattr(memory, "Path", Missing)
    with memory.PeakMemory() as peak:
        pass
    assert peak.mib is None and peak.above_start_mib is None
