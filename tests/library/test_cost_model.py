"""The cost model of the GPU designs (bench/library/cost_model.py) reads the backends' real launch
geometry: its choices hold for the standard shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "library"))


def test_strips_stay_near_the_gemm_floor_and_the_atomic_backward_does_not():
    import cost_model as cm  # noqa: PLC0415

    for shape in cm.TRAINING[1:]:  # the large heads, where the GEMMs dominate
        floor = sum(k.seconds(cm.H200) for k in cm.three_gemm_floor(shape))
        strips = sum(k.seconds(cm.H200) for k in cm.strips_with_gradients(shape))
        atomic = sum(k.seconds(cm.H200) for k in cm.fused_atomic_backward(shape))
        assert strips < 1.3 * floor < atomic / 10
        assert sum(k.atomics for k in cm.strips_with_gradients(shape)) == 0


def test_decoding_fills_the_gpu_only_with_vocabulary_splits():
    import cost_model as cm  # noqa: PLC0415

    for shape in cm.DECODING:
        for gpu in (cm.H200, cm.A100):
            split = cm.fused_forward_split(shape, gpu, split=True)[0]
            single = cm.fused_forward_split(shape, gpu, split=False)[0]
            # one wave, nearly full: at least 90% of the SMs busy, none with a second program
            assert 0.9 * gpu.sms <= split.programs <= gpu.sms and single.programs < gpu.sms
            assert split.seconds(gpu) * 20 < single.seconds(gpu)


def test_report_renders():
    import cost_model as cm  # noqa: PLC0415

    text = cm.report()
    assert "Llama-3 8192x4096x128256" in text and "vocabulary split (chosen)" in text
