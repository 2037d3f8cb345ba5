"""The fp32-result GEMMs of the GPU strips (``strips.mm_f32`` and kin): bf16 / fp16 inputs, fp32
results written straight into the strip, and the path each took (ATen's out_dtype= kernel, or
an upcast where there is none) recorded and logged."""

from __future__ import annotations

import logging

import pytest
import torch

from vocabsem_fast.backends import strips

from helpers import assert_matches, make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_gemms_write_into_their_output_and_name_their_path(monkeypatch, caplog, dtype):
    """The GPU strips' GEMMs: bf16 / fp16 inputs, fp32 results written into the given output (the
    strip). Where ATen has no out_dtype= kernel (the CPU) the inputs are upcast, and the path each
    GEMM took is recorded and logged once."""
    monkeypatch.setattr(strips, "GEMM_PATHS", {})
    a, b = make(13, 37, dtype=dtype), make(37, 29, dtype=dtype)
    expected = a.double() @ b.double()
    out = torch.full((13, 29), float("nan"))
    with caplog.at_level(logging.INFO, logger="vocabsem_fast"):
        result = strips.mm_f32(a, b, out=out)
        strips.mm_f32(a, b, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == torch.float32
    assert_matches(out.double(), expected, tol=1e-5, name="mm into the strip")
    acc = torch.ones(13, 29)
    strips.add_mm_f32(acc, a, b)
    assert_matches(acc.double(), expected + 1, tol=1e-5, name="addmm into the accumulator")
    assert_matches(strips.bmm_f32(a[None], b[None])[0].double(), expected, tol=1e-5, name="bmm")
    name = str(dtype).removeprefix("torch.")
    assert strips.GEMM_PATHS == {f"mm cpu {name}": "upcast", f"addmm cpu {name}": "upcast", f"bmm cpu {name}": "upcast"}
    assert sum(f"mm cpu {name}:" in r.getMessage() for r in caplog.records) == 1, "logged once per GEMM"


def test_a_working_out_dtype_gemm_is_recorded_as_such(monkeypatch):
    monkeypatch.setattr(strips, "GEMM_PATHS", {})
    a = make(3, 4, dtype=torch.bfloat16)
    calls = []
    assert strips._fp32_result("mm", a, lambda: calls.append("native") or 1, lambda: calls.append("upcast")) == 1
    assert strips.GEMM_PATHS == {"mm cpu bfloat16": "out_dtype"} and calls == ["native"]
