"""What the CPU offers low-precision GEMMs and what oneDNN picked: recorded with every CPU
benchmark (pytest-benchmark machine info) and printed by ``python bench/library/cpu_isa.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")

_PROBE = """
import torch
a, b = torch.randn(256, 576), torch.randn(4096, 576)
torch.mm(a.bfloat16(), b.bfloat16().T)
torch.mm(a.half(), b.half().T)
"""


def _onednn_lines() -> list[str]:
    """oneDNN's verbose lines for one bf16 and one fp16 GEMM, in a fresh process."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("onednn_verbose")]


def report() -> dict:
    import torch

    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    lines = _onednn_lines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), None)
    matmuls = [line.split(",")[5:8] for line in lines if ",exec,cpu,matmul," in line]
    return {
        "cpu_flags": [f for f in FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "onednn_isa": isa,
        # (primitive, implementation, ...) of each GEMM oneDNN ran: bf16 only, fp16 goes elsewhere
        "onednn_matmuls": [",".join(m) for m in matmuls],
        "fp16_on_onednn": any("f16" in line and "bf16" not in line for line in lines if ",exec," in line),
    }


if __name__ == "__main__":
    print(json.dumps(report(), indent=2))
