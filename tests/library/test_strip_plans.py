"""The strip algorithm's two plans (rows: three GEMMs and a bases accumulator; columns: a lse
pass, then column chunks) against the reference, and the C++ epilogue's bf16 scores and
column-chunk mode against its float32 whole-row mode."""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends import strips
from vocabsem_fast.backends.tiles import tile_config

from helpers import assert_close, assert_error_bound, leaf, make, make_targets

pytestmark = pytest.mark.skipif("cpu" not in vf.available_backends(), reason="the C++ extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
# "blocks": 8480 bytes, so the column plan takes 256-column chunks in blocks of 8 (fp32) or 16
# (bf16) rows, and the row plan strips of 1 row (128 when the bases' gradient accumulates);
# "one block": every row in one block of a column chunk (the bases' chunk gradient formed in place)
WORKSPACES = {"blocks": dict(max_elements=530, max_rows=8, min_columns=16),
              "one block": dict(max_elements=6000, max_rows=8, min_columns=16)}
WORKSPACE = WORKSPACES["blocks"]


def _ext():
    from vocabsem_fast import _C  # noqa: PLC0415

    return _C


def _case(dtype, plan, normalize, smoothing, workspace, n=77, d=45, v=1031):
    hidden, bases = make(n, d, dtype=dtype), make(v, d, dtype=dtype)
    targets = make_targets((n,), v)
    upstream = torch.rand(n, dtype=torch.float64) + 0.5  # per-row weights reach the gradient tiles
    # raw dot products grow with sqrt(d): at scale 6 their half-precision rounding alone would
    # swamp the comparison, so "dot" logits are kept near unit size
    scale = 6.0 if normalize else 1.0 / d ** 0.5
    results = []
    for mod, cast in ((vf, dtype), (ref, dtype), (ref, torch.float64)):
        h, b = leaf(hidden, cast), leaf(bases, cast)
        kwargs = dict(impl="cpu") if mod is vf else {}
        with tile_config(**WORKSPACES[workspace], strip_plan=plan):
            out = mod.similarity_cross_entropy(h, b, targets, scale=scale, normalize=normalize,
                                               label_smoothing=smoothing, reduction="none", **kwargs)
            (out.double() * upstream).sum().backward()
        results.append((out, h.grad, b.grad))
    return results


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("plan,workspace", [("rows", "blocks"), ("columns", "blocks"), ("columns", "one block")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_each_plan_matches_the_reference(dtype, plan, workspace, normalize, smoothing):
    (out, dh, db), (r_out, r_dh, r_db), (t_out, t_dh, t_db) = _case(dtype, plan, normalize, smoothing, workspace)
    assert dh.dtype == dtype and db.dtype == dtype
    if dtype == torch.float64:
        for name, got, truth in (("loss", out, t_out), ("hidden.grad", dh, t_dh), ("bases.grad", db, t_db)):
            magnitude = max(1.0, truth.abs().max().item())
            assert_close(got, truth, rtol=1e-10, atol=1e-10 * magnitude, name=f"{plan} {name}")
        return
    # within twice the reference's own error in this dtype (plus a small slack)
    assert_error_bound(out, r_out, t_out, name=f"{plan} loss")
    assert_error_bound(dh, r_dh, t_dh, name=f"{plan} hidden.grad")
    assert_error_bound(db, r_db, t_db, name=f"{plan} bases.grad")


@pytest.mark.parametrize("n", [0, 1, 3])
def test_column_plan_with_few_or_no_rows(n):
    hidden, bases = make(n, 7, requires_grad=True), make(301, 7, requires_grad=True)
    targets = make_targets((n,), 301, ignored=0.0)
    with tile_config(**WORKSPACE, strip_plan="columns"):
        vf.similarity_cross_entropy(hidden, bases, targets, scale=3.0, reduction="sum", impl="cpu").backward()
    rh, rb = leaf(hidden), leaf(bases)
    ref.similarity_cross_entropy(rh, rb, targets, scale=3.0, reduction="sum").backward()
    assert_close(hidden.grad, rh.grad, rtol=1e-5, atol=1e-6, name="hidden.grad")
    assert_close(bases.grad, rb.grad, rtol=1e-5, atol=1e-6, name="bases.grad")


def test_the_plan_follows_the_workspace():
    kernels = _ext_kernels()
    mib = 1 << 20

    def plan(n, v, d, dtype, workspace, need_bases=True):
        return strips.plan_for(kernels, n, v, d, dtype, True, need_bases, workspace)

    # SmolLM2's head in bf16: the (V, d) float32 accumulator alone (108 MiB) exceeds 64 MiB; with
    # 160 MiB, what remains (less the hidden accumulator) holds 256 rows of bf16 scores (24 MiB)
    assert plan(2048, 49152, 576, torch.bfloat16, 64 * mib) == "columns"
    assert plan(2048, 49152, 576, torch.bfloat16, 160 * mib) == "rows"
    assert plan(2048, 49152, 576, torch.bfloat16, 128 * mib) == "columns"
    # float32 accumulates into the returned gradient: 256 rows of scores (48 MiB) fit 64 MiB
    assert plan(2048, 49152, 576, torch.float32, 64 * mib) == "rows"
    # Llama-3's head: 256 rows of 128256 float32 scores (125 MiB) need more than 64 MiB
    assert plan(1024, 128256, 4096, torch.float32, 64 * mib) == "columns"
    assert plan(1024, 128256, 4096, torch.float32, 256 * mib) == "rows"
    # only the hidden states' gradient: no accumulator, no minimum of rows
    assert plan(1024, 128256, 4096, torch.bfloat16, 64 * mib, need_bases=False) == "rows"
    with tile_config(strip_plan="rows"):
        assert plan(1024, 128256, 4096, torch.bfloat16, 64 * mib) == "rows"
    with pytest.raises(ValueError, match="strip_plan"), tile_config(strip_plan="diagonal"):
        pass


def test_the_cpu_workspace_grows_with_the_bases_only_for_their_gradient():
    from vocabsem_fast.backends.cpu import CpuBackend  # noqa: PLC0415

    mib = 1 << 20
    llama = torch.empty(128256, 4096)  # 2004 MiB of float32 bases
    smol = torch.empty(49152, 576)
    assert CpuBackend.workspace_bytes(smol, True) == 64 * mib
    assert CpuBackend.workspace_bytes(llama, True) == llama.numel() * 4 // 8
    assert CpuBackend.workspace_bytes(llama, False) == 64 * mib


def _ext_kernels():
    from vocabsem_fast.backends.cpu import CpuStripKernels  # noqa: PLC0415

    return CpuStripKernels(_ext())


def _epilogue_inputs(rows=13, cols=301):
    scores = (torch.randn(rows, cols) * 4).to(torch.bfloat16)  # values a bf16 GEMM could return
    row_scale = torch.rand(rows) + 0.5
    col_scale = torch.rand(cols) + 0.5
    targets = torch.randint(0, cols, (rows,))
    valid = torch.rand(rows) > 0.2
    weight = torch.randn(rows)
    return scores, row_scale, col_scale, targets, valid, weight


@pytest.mark.parametrize("with_weight", [True, False])
def test_bf16_scores_give_the_float32_epilogue_rounded_once(with_weight):
    ext = _ext()
    scores, row_scale, col_scale, targets, valid, weight = _epilogue_inputs()
    scores[2, 5] = float("nan")
    wide = scores.float()
    w = weight if with_weight else None
    loss32, lse32 = ext.cross_entropy_strip(wide, row_scale, col_scale, targets, valid, w, 0.1)
    loss16, lse16 = ext.cross_entropy_strip(scores, row_scale, col_scale, targets, valid, w, 0.1)
    assert loss16.dtype == torch.float32 and lse16.dtype == torch.float32
    assert_close(loss16, loss32, rtol=0, atol=0, name="loss")
    assert_close(lse16, lse32, rtol=0, atol=0, name="lse")
    if with_weight:  # the tile is the float32 tile rounded to nearest even, NaN kept
        expected = wide.to(torch.bfloat16)
        assert torch.equal(scores.view(torch.int16)[~expected.isnan()], expected.view(torch.int16)[~expected.isnan()])
        assert bool(scores[expected.isnan()].isnan().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_column_chunks_give_the_whole_row_tile(dtype):
    ext = _ext()
    scores, row_scale, col_scale, targets, valid, weight = _epilogue_inputs()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale, col_scale, weight = row_scale.to(acc), col_scale.to(acc), weight.to(acc)
    whole = scores.to(dtype, copy=True)
    _, lse = ext.cross_entropy_strip(whole, row_scale, col_scale, targets, valid, weight, 0.1)
    pieces = []
    for c0, c1 in ((0, 97), (97, 98), (98, 301)):
        chunk = scores[:, c0:c1].to(dtype, copy=True).contiguous()
        out = ext.cross_entropy_strip(chunk, row_scale, col_scale[c0:c1].contiguous(), targets, valid, weight, 0.1,
                                      lse=lse, col_offset=c0, vocab=301)
        assert all(t.numel() == 0 for t in out)  # a chunk returns no loss
        pieces.append(chunk)
    tol = 1e-12 if dtype == torch.float64 else (2 ** -8 if dtype == torch.bfloat16 else 1e-6)
    magnitude = whole.abs().max().item()
    assert_close(torch.cat(pieces, 1), whole, rtol=tol, atol=tol * magnitude, name="gradient tile")


def test_a_chunk_outside_the_vocabulary_is_refused():
    ext = _ext()
    scores, row_scale, col_scale, targets, valid, weight = _epilogue_inputs(cols=50)
    lse = torch.zeros(scores.shape[0])
    with pytest.raises(ValueError, match="chunk"):
        ext.cross_entropy_strip(scores, row_scale, col_scale, targets, valid, weight, 0.0, lse=lse, col_offset=260,
                                vocab=301)
    with pytest.raises(ValueError, match="weight"):
        ext.cross_entropy_strip(scores, row_scale, col_scale, targets, valid, None, 0.0, lse=lse, col_offset=0,
                                vocab=301)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_partial_chunks_merge_into_the_whole_row_loss(dtype, smoothing):
    ext = _ext()
    scores, row_scale, col_scale, targets, valid, _ = _epilogue_inputs()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale, col_scale = row_scale.to(acc), col_scale.to(acc)
    scores = scores.to(dtype)
    loss, lse = ext.cross_entropy_strip(scores.clone(), row_scale, col_scale, targets, valid, None, smoothing)
    merged_lse, terms = torch.full_like(lse, float("-inf")), torch.zeros_like(loss)
    for c0, c1 in ((0, 97), (97, 98), (98, 301)):
        chunk = scores[:, c0:c1].contiguous()
        before = chunk.clone()
        part, chunk_lse = ext.cross_entropy_strip(chunk, row_scale, col_scale[c0:c1].contiguous(), targets, valid,
                                                  None, smoothing, col_offset=c0, vocab=301)
        assert torch.equal(chunk, before)  # read-only: the second pass may reuse these scores
        merged_lse = torch.logaddexp(merged_lse, chunk_lse)
        terms += part
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(merged_lse, lse, rtol=tol, atol=tol, name="lse")
    assert_close(torch.where(valid, merged_lse + terms, 0.0), loss, rtol=tol, atol=tol * 10, name="loss")
    with pytest.raises(ValueError, match="weight must be None"):
        ext.cross_entropy_strip(scores[:, :50].contiguous(), row_scale, col_scale[:50].contiguous(), targets % 50,
                                valid, torch.ones_like(row_scale), 0.0, col_offset=0, vocab=301)
