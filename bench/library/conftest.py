"""Benchmark session hooks: the CPU's ISA report goes into every result file's machine info."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_benchmark_update_machine_info(config, machine_info):
    import cpu_isa  # noqa: PLC0415

    machine_info["cpu_isa"] = cpu_isa.report()
