"""Peak extra resident memory of one workload, measured in a fresh process.

``python bench/library/peak_memory.py CONTENDER SHAPE MODE [fp32|bf16]`` prints one JSON line:
``{"extra_peak_bytes", "workspace_bytes", "input_bytes"}`` (workspace = extra peak less
the gradients, which fwd+bwd must return). The process builds the inputs, runs the
workload once to warm up, resets the kernel's high-water mark (``/proc/self/clear_refs``), runs
it again and reads ``VmHWM``. glibc is told to serve every allocation above 64 KiB by mmap and
to return freed memory at once, so the figure is the true peak, not the allocator's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(contender: str, shape_name: str, mode: str, dtype: str = "fp32") -> dict:
    """Run this file in a fresh interpreter and return what it measured."""
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, __file__, contender, shape_name, mode, dtype], env=env, check=True, capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(contender: str, shape_name: str, mode: str, dtype: str = "fp32") -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import gc

    import torch

    import workloads

    if mode == "hard_assign":
        points, centroids = workloads.assignment_inputs()
        hidden, bases, targets = points, centroids, torch.empty(0)
    else:
        hidden, bases, targets = workloads.make_inputs(workloads.SHAPES[shape_name], workloads.DTYPES[dtype])

    def run():
        if mode == "hard_assign":
            return workloads.hard_assign_step(contender, hidden, bases)
        if mode == "topk":
            return workloads.topk_step(contender, hidden, bases)
        return workloads.cross_entropy_step(contender, hidden, bases, targets, backward=(mode == "fwd+bwd"))

    run()
    gc.collect()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = run()
    peak = _status_kib("VmHWM")
    del result
    input_bytes = sum(t.numel() * t.element_size() for t in (hidden, bases, targets))
    # the gradients w.r.t. hidden and bases are outputs of fwd+bwd, not workspace
    gradient_bytes = (hidden.numel() + bases.numel()) * hidden.element_size() if mode == "fwd+bwd" else 0
    extra = (peak - baseline) * 1024
    print(json.dumps({"extra_peak_bytes": extra, "workspace_bytes": extra - gradient_bytes,
                      "input_bytes": input_bytes}))


if __name__ == "__main__":
    _main(*sys.argv[1:5])
