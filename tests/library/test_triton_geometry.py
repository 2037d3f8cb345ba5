"""Launch geometry of the Triton kernels, as plain functions of the sizes (no GPU, no interpreter):
decoding shapes keep every SM of an H200 busy, splits tile the vocabulary exactly."""

from __future__ import annotations

import importlib.util

import pytest

from vocabsem_fast.gpu_geometry import balanced_splits, finish_time

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
    if row_blocks < sms:  # one wave: no SM runs a second program while others idle
        assert row_blocks * splits <= sms, f"{row_blocks} x {splits} programs for {sms} SMs"
    # as soon done as an even split of the vocabulary blocks over the SMs could be
    v_blocks = -(-v // config["BLOCK_V"])
    per_wave = max(1, sms // row_blocks)
    assert finish_time(row_blocks, v_blocks, splits, sms) <= max(-(-v_blocks // per_wave),
                                                                 finish_time(row_blocks, v_blocks, 1, sms))
    assert row_blocks * config["BLOCK_N"] >= n > (row_blocks - 1) * config["BLOCK_N"]
    assert split_cols % config["BLOCK_V"] == 0
    assert splits * split_cols >= v > (splits - 1) * split_cols, "every split non-empty, all columns covered"
    if n >= sms * config["BLOCK_N"]:
        assert splits == 1, "many rows fill the GPU without splitting the vocabulary"


def test_a_small_vocabulary_is_never_split_below_one_block():
    s = _similarity()
    (row_blocks, splits), split_cols = s.split_grid(1, 100, 16, 64, H200_SMS)
    assert (row_blocks, splits, split_cols) == (1, 2, 64)


@pytest.mark.parametrize("v,splits", [(128256, 126), (32000, 125)])
def test_decoding_fills_one_wave_not_two(v, splits):
    """One row against the Llama-3 / Llama-2 vocabularies on 132 SMs: splits of 16 / 4 blocks (126 /
    125 programs, one wave), where splits of 15 / 3 blocks made 134 / 167 programs and a second wave."""
    s = _similarity()
    (row_blocks, got), split_cols = s.split_grid(1, v, 16, 64, H200_SMS)
    assert (row_blocks, got) == (1, splits)
    assert finish_time(1, -(-v // 64), got, H200_SMS) < finish_time(1, -(-v // 64), 134 if v == 128256 else 167,
                                                                        H200_SMS)


@pytest.mark.parametrize("rows", [1, 3, 5, 40, 100, 131, 132, 500])
@pytest.mark.parametrize("units", [1, 7, 500, 2004])
@pytest.mark.parametrize("sms", [H200_SMS, A100_SMS])
def test_balanced_splits_is_the_fastest_count(rows, units, sms):
    """Against every count up to one wave: none finishes sooner, and the count returned is that of
    the non-empty splits."""
    got = balanced_splits(rows, units, sms)
    limit = max(1, min(units, -(-sms // rows)))
    assert 1 <= got <= limit
    assert finish_time(rows, units, got, sms) == min(finish_time(rows, units, s, sms) for s in range(1, limit + 1))
    per = -(-units // got)
    assert -(-units // per) == got, "every split holds work"


def test_decoding_uses_the_few_rows_configuration():
    s = _similarity()
    assert s.forward_config(1)["BLOCK_N"] == 16 and s.forward_config(4096)["BLOCK_N"] == 64
    assert s.topk_config(8)["BLOCK_N"] == 16
