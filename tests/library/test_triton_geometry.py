"""Launch geometry of the Triton kernels, as plain functions of the sizes (no GPU, no interpreter):
decoding shapes keep every SM of an H200 busy, splits tile the vocabulary exactly."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

H200_SMS, A100_SMS = 132, 108


def _similarity():
    from vocabsem_fast.kernels import similarity  # noqa: PLC0415  (imports triton)

    return similarity


@pytest.mark.parametrize("n", [1, 8, 64, 2048, 16384])
@pytest.mark.parametrize("v", [32000, 49152, 128256, 256000])
@pytest.mark.parametrize("sms", [H200_SMS, A100_SMS])
@pytest.mark.parametrize("kernel", ["forward", "topk"])
def test_every_sm_has_a_program_and_the_splits_tile_the_vocabulary(kernel, sms, v, n):
    s = _similarity()
    config = s.forward_config(n) if kernel == "forward" else s.topk_config(n)  # the bf16 / fp16 configurations
    (row_blocks, splits), split_cols = s.split_grid(n, v, config["BLOCK_N"], config["BLOCK_V"], sms)
    assert row_blocks * splits >= sms, f"{row_blocks} x {splits} programs for {sms} SMs"
    assert row_blocks * config["BLOCK_N"] >= n > (row_blocks - 1) * config["BLOCK_N"]
    assert split_cols % config["BLOCK_V"] == 0
    assert splits * split_cols >= v > (splits - 1) * split_cols, "every split non-empty, all columns covered"
    if n >= sms * config["BLOCK_N"]:
        assert splits == 1, "many rows fill the GPU without splitting the vocabulary"


def test_a_small_vocabulary_is_never_split_below_one_block():
    s = _similarity()
    (row_blocks, splits), split_cols = s.split_grid(1, 100, 16, 64, H200_SMS)
    assert (row_blocks, splits, split_cols) == (1, 2, 64)


def test_decoding_uses_the_few_rows_configuration():
    s = _similarity()
    assert s.forward_config(1)["BLOCK_N"] == 16 and s.forward_config(4096)["BLOCK_N"] == 64
    assert s.topk_config(8)["BLOCK_N"] == 16
