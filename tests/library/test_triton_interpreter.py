"""The triton backend's kernels, run on the CPU under the Triton interpreter.

The interpreter has to be chosen before triton compiles anything and it is slow, so the cases
live in gpu_backend_cases.py and run here in a child pytest with TRITON_INTERPRET=1; its report is
shown on failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a CUDA machine runs the compiled kernels instead (bench/gpu_check.py)")
def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "gpu_backend_cases.py"), "-q", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, cwd=HERE.parents[1], timeout=1800)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    summary = report.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, report
