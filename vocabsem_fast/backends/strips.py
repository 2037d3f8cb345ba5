"""The strip algorithm of the fused cross-entropy, shared by the cpu and cuda backends.

Row plan (three GEMMs). Rows are processed in strips of R rows against the whole vocabulary:

1. ``S = hidden[strip] @ bases.T`` on the raw inputs (fp32 accumulation);
2. the device's epilogue folds in the scales (``scale / |h_r|`` per row, ``1 / |b_c|`` per
   column), gives each row's loss and log-sum-exp and, when gradients are wanted, turns ``S`` in
   place into the tile ``G = scale * w_r * (softmax - target) / |b_c|``;
3. ``G @ bases`` is the gradient w.r.t. the strip's normalised hidden rows, and
   ``G.T @ (hidden[strip] / |h|)`` accumulates ``|b|^-1`` times the gradient w.r.t. the
   normalised bases; the normalisation backward then runs once on each accumulated gradient.

The bases' gradient sums over every strip, so this plan holds a (V, d) accumulator: free when the
inputs are in the accumulation dtype (it is the returned gradient), V x d x 4 bytes otherwise.

Column plan (four GEMMs less one chunk's, bounded workspace). The vocabulary is walked in column
chunks of (rows x chunk) tiles twice: the first pass merges each row's log-sum-exp and loss over
the chunks; the second recomputes each tile (but the one still in the buffer) and turns it into
its gradient tile with the known lse, so each chunk's bases gradient is complete after its rows
(normalisation backward, written out) and only the hidden gradient, N x d, accumulates.
``choose_plan`` takes the rows when their workspace fits the budget.

Inverse norms enter as scales, so no normalised copy of the bases exists. Scores may be kept in
a narrower dtype than the accumulation dtype (bf16 on the CPU: the native GEMM's own output,
widened a row at a time by the epilogue). What differs between devices (the GEMMs, the epilogue,
the norm kernels) is a ``StripKernels`` object; the orchestration below is the same for all.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import Tensor

from ..options import LossOptions, SimilarityOptions, accumulate_dtype
from .normalization import inverse_norms, normalization_backward, normalization_temporaries
from .tiles import current_tiles

# The column plan's narrowest chunk (a GEMM dimension), and the least rows a row strip takes when
# it accumulates the bases' gradient: each strip's G.T @ rows is a GEMM of inner size R that
# reads and writes the whole (V, d) accumulator. Measured at the Llama-3 head in fp32 on two
# cores (GEMM floor 16.9-17.2 s): strips of 96-130 rows 21.2-21.5 s, 256 rows 17.8-19.4 s,
# 512 rows 17.2-17.8 s, one strip of 1024 rows 17.1-17.7 s.
MIN_CHUNK_COLUMNS = 256
MIN_ACCUMULATING_ROWS = 256


class StripKernels(Protocol):
    """The device-specific pieces of the strip algorithm."""

    # Whether the epilogue makes a logit 0 wherever its scale factor is 0 (an overflowed norm)
    # whatever the raw score (0 x inf would be NaN). Where it does not, the orchestration clears
    # those rows and columns of each tile, and finding them reads data on the host: only kernels
    # that run on the CPU may leave it to the orchestration.
    epilogue_zeroes_zero_scales: bool

    def score_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the scores of ``dtype`` inputs are kept in (the accumulation dtype or narrower)."""

    def inverse_norms(self, x: Tensor, eps: float) -> Tensor:
        """1 / max(|row|, eps) in the accumulation dtype."""

    def scores(self, rows: Tensor, bases: Tensor, out: Tensor) -> None:
        """out (R, C) <- rows @ bases.T with fp32 accumulation, in out's dtype."""

    def epilogue(self, scores: Tensor, row_scale: Tensor, col_scale: Tensor | None, targets: Tensor,
                 ignore_index: int, weight: Tensor | None, smoothing: float) -> tuple[Tensor, Tensor]:
        """Per-row (loss, lse) of logits ``scores * row_scale[r] * col_scale[c]`` (loss 0 where
        ignored); with ``weight``, scores <- the gradient tile, in place."""

    def gradient_products(self, tile: Tensor, bases: Tensor, rows: Tensor, grad_rows: Tensor | None,
                          grad_bases: Tensor | None, first_rows: bool, first_bases: bool) -> None:
        """grad_rows (R, d) <- tile @ bases, grad_bases (C, d) <- tile.T @ rows: written when
        ``first_*``, added otherwise (either may be None: not wanted). ``rows`` in the inputs' dtype."""

    def normalization_backward(self, x: Tensor, inv: Tensor, grad: Tensor, eps: float,
                               grad_times_inv: bool, out: Tensor | None = None) -> Tensor:
        """Gradient w.r.t. the raw rows of ``x * inv`` (see ``normalization.normalization_backward``),
        into ``out`` when given."""


class ChunkKernels(StripKernels, Protocol):
    """Kernels that also run the column plan."""

    def chunk_partials(self, scores: Tensor, row_scale: Tensor, col_scale: Tensor | None, targets: Tensor,
                       ignore_index: int, smoothing: float, col_offset: int, vocab: int) -> tuple[Tensor, Tensor]:
        """Per row, over columns [col_offset, col_offset + C) of the vocabulary: the chunk's terms
        of the loss (-(1 - ls) z_target where the target is in the chunk, - ls sum(z) / V; 0 where
        ignored) and its log-sum-exp; scores unchanged."""

    def chunk_epilogue(self, scores: Tensor, row_scale: Tensor, col_scale: Tensor | None, targets: Tensor,
                       ignore_index: int, weight: Tensor, smoothing: float, lse: Tensor, col_offset: int,
                       vocab: int) -> None:
        """scores (R, C), columns [col_offset, col_offset + C) of the vocabulary <- their gradient
        tile, in place, given each row's lse over the whole vocabulary."""


def strip_rows(n: int, v: int, d: int, strip_bytes: int, score_size: int, need_bases: bool,
               row_size: int = 0) -> int:
    """Rows per strip: ``strip_bytes`` of scores (``score_size`` bytes each, plus ``row_size``
    bytes of row data per row), but at least MIN_ACCUMULATING_ROWS when the bases' gradient is
    accumulated (each strip sweeps that (V, d) gradient once)."""
    wanted = max(strip_bytes // max(v * score_size + row_size, 1), MIN_ACCUMULATING_ROWS if need_bases else 1)
    return max(1, min(max(n, 1), wanted))


class _Budget:
    """How one call's workspace divides: what each plan holds besides its score buffer."""

    def __init__(self, kernels, n: int, v: int, d: int, dtype: torch.dtype, need_hidden: bool, need_bases: bool,
                 workspace_bytes: int):
        acc = accumulate_dtype(dtype)
        self.n, self.v, self.d, self.need_bases = n, v, d, need_bases
        self.score_size = kernels.score_dtype(dtype).itemsize
        self.workspace = workspace_bytes
        narrow = dtype != acc  # gradients accumulate beside, not in, the returned ones
        # per-row and per-column vectors (inverse norms, scales, weights, loss, lse, targets' masks)
        vectors = (v + 8 * n) * acc.itemsize
        hidden_accumulator = (n * d * acc.itemsize if need_hidden and narrow else 0) + vectors
        # row plan: the (V, d) bases accumulator, the hidden one, per row of a strip its scores and
        # normalised row; the normalisation backward runs after the strips are freed
        self.rows_fixed = (v * d * acc.itemsize if need_bases and narrow else 0) + hidden_accumulator
        self.row_size = d * dtype.itemsize if need_bases else 0
        # column plan: the (N, d) hidden accumulator, the normalised rows, and the normalisation
        # backward's temporaries, which run beside the buffer (chunk by chunk)
        self.columns_fixed = ((n * d * acc.itemsize if need_hidden else 0) + (n * d * dtype.itemsize if need_bases
                                                                               else 0)
                              + (normalization_temporaries(d) if need_bases else 0) + vectors)

    def strip_bytes(self) -> int:
        return self.workspace - self.rows_fixed

    def rows_fit(self) -> bool:
        smallest = strip_rows(self.n, self.v, self.d, 0, 1, self.need_bases)
        return smallest * (self.v * self.score_size + self.row_size) <= self.strip_bytes()

    def buffer_elements(self) -> int:
        return max(1, (self.workspace - self.columns_fixed) // self.score_size)


def plan_for(kernels, n: int, v: int, d: int, dtype: torch.dtype, need_hidden: bool, need_bases: bool,
             workspace_bytes: int) -> str:
    """The plan a call with gradients of these sizes takes within ``workspace_bytes``."""
    return choose_plan(kernels, _Budget(kernels, n, v, d, dtype, need_hidden, need_bases, workspace_bytes))


def choose_plan(kernels, budget: _Budget) -> str:
    """"rows" or "columns" for a call with gradients (see the module docstring): the rows when
    their accumulator and smallest strip fit the workspace or the kernels have no column plan;
    ``tile_config(strip_plan=...)`` forces one."""
    if not hasattr(kernels, "chunk_epilogue"):
        return "rows"
    forced = current_tiles().strip_plan
    if forced != "auto":
        return forced
    return "rows" if budget.rows_fit() else "columns"


def strip_cross_entropy(kernels: StripKernels, hidden: Tensor, bases: Tensor, targets: Tensor,
                        sim: SimilarityOptions, loss: LossOptions, weight: Tensor | None, need_hidden: bool,
                        need_bases: bool, workspace_bytes: int):
    """Per-row loss and lse and, with ``weight`` (N,), the gradients of ``sum_i weight_i * loss_i``
    w.r.t. ``hidden`` (N, d) and ``bases`` (V, d) (None where not asked for). ``workspace_bytes``
    bounds the strips (and, through the plan, the accumulator)."""
    acc = accumulate_dtype(hidden.dtype)
    n, d, v = hidden.shape[0], hidden.shape[1], bases.shape[0]
    need_grad = weight is not None and (need_hidden or need_bases)
    need_hidden, need_bases = need_grad and need_hidden, need_grad and need_bases
    f = dict(dtype=acc, device=hidden.device)
    inv_h = kernels.inverse_norms(hidden, sim.eps) if sim.normalize else None
    inv_b = kernels.inverse_norms(bases, sim.eps) if sim.normalize else None
    row_scale = inv_h * sim.scale if inv_h is not None else torch.full((n,), sim.scale, **f)
    tile_weight = weight.to(acc) * sim.scale if need_grad else None  # the scale of d z / d(normalised rows)
    scaled = _Scaled(hidden, bases, targets, inv_h, inv_b, row_scale, tile_weight, sim, loss,
                     find_zero_scales=not kernels.epilogue_zeroes_zero_scales)

    budget = _Budget(kernels, n, v, d, hidden.dtype, need_hidden, need_bases, workspace_bytes)
    plan = choose_plan(kernels, budget) if need_grad else "rows"
    if plan == "columns":
        per_row, lse, grad_h, db = _column_plan(kernels, scaled, need_hidden, need_bases, budget)
    else:
        per_row, lse, grad_h, grad_b = _row_strips(kernels, scaled, need_hidden, need_bases, budget)
        db = None
        if need_bases:
            db = (kernels.normalization_backward(bases, inv_b, grad_b, sim.eps, True) if inv_b is not None
                  else grad_b.to(bases.dtype))
    dh = None
    if need_hidden:
        dh = (kernels.normalization_backward(hidden, inv_h, grad_h, sim.eps, False) if inv_h is not None
              else grad_h.to(hidden.dtype))
    return per_row, lse, dh, db


def _zero_positions(inverse: Tensor | None) -> Tensor | None:
    if inverse is None:
        return None
    zero = inverse == 0
    return zero.nonzero()[:, 0] if bool(zero.any()) else None


class _Scaled:
    """One call's inputs with their scales, as both plans read them."""

    def __init__(self, hidden, bases, targets, inv_h, inv_b, row_scale, tile_weight, sim, loss, *,
                 find_zero_scales: bool):
        self.hidden, self.bases, self.targets = hidden, bases, targets
        self.inv_h, self.inv_b, self.row_scale, self.tile_weight = inv_h, inv_b, row_scale, tile_weight
        self.sim, self.loss = sim, loss
        self.acc = accumulate_dtype(hidden.dtype)
        # Rows or bases whose norm overflows have inverse norm 0: F.normalize makes them 0, so their
        # scores are 0, where a raw product that overflowed would give 0 x inf = NaN. (While both
        # norms are finite no dot product of theirs overflows: |h . b| <= |h| |b|.) Rare: found
        # once per call, and only then cleared tile by tile, unless the epilogue does it.
        self.overflow_rows = _zero_positions(inv_h) if find_zero_scales else None
        self.overflow_cols = _zero_positions(inv_b) if find_zero_scales else None

    def scores(self, kernels, r0: int, r1: int, c0: int, c1: int, out: Tensor) -> None:
        """out <- the raw scores of rows [r0, r1) against bases [c0, c1)."""
        kernels.scores(self.hidden[r0:r1], self.bases[c0:c1], out)
        if self.overflow_rows is not None:
            rows = self.overflow_rows[(self.overflow_rows >= r0) & (self.overflow_rows < r1)] - r0
            out.index_fill_(0, rows, 0)
        if self.overflow_cols is not None:
            cols = self.overflow_cols[(self.overflow_cols >= c0) & (self.overflow_cols < c1)] - c0
            out.index_fill_(1, cols, 0)

    def normalized_rows(self, r0: int, r1: int) -> Tensor:
        """hidden[r0:r1] / |h| in the inputs' dtype: the right-hand side of the bases' gradient GEMM."""
        rows = self.hidden[r0:r1]
        if self.inv_h is None:
            return rows
        return (rows.to(self.acc) * self.inv_h[r0:r1, None]).to(self.hidden.dtype)


def _row_strips(kernels, x: _Scaled, need_hidden: bool, need_bases: bool, budget: _Budget):
    """The row plan; without gradients, the forward pass of the column plan too."""
    n, d, v = x.hidden.shape[0], x.hidden.shape[1], x.bases.shape[0]
    need_grad = need_hidden or need_bases
    f = dict(dtype=x.acc, device=x.hidden.device)
    per_row, lse = torch.empty(n, **f), torch.empty(n, **f)
    grad_h = torch.empty(n, d, **f) if need_hidden else None
    grad_b = torch.empty(v, d, **f) if need_bases else None  # the first strip writes, the others add
    score_dtype = kernels.score_dtype(x.hidden.dtype)
    # the row plan forced beyond its budget: strips as if the accumulators took nothing
    strip_bytes = budget.strip_bytes() if budget.rows_fit() else budget.workspace
    rows_per_strip = strip_rows(n, v, d, strip_bytes, score_dtype.itemsize, need_bases, budget.row_size)
    buffer = torch.empty(rows_per_strip, v, dtype=score_dtype, device=x.hidden.device)
    for r0 in range(0, n, rows_per_strip):
        r1 = min(n, r0 + rows_per_strip)
        tile = buffer[: r1 - r0]
        x.scores(kernels, r0, r1, 0, v, tile)
        per_row[r0:r1], lse[r0:r1] = kernels.epilogue(
            tile, x.row_scale[r0:r1], x.inv_b, x.targets[r0:r1], x.loss.ignore_index,
            x.tile_weight[r0:r1] if need_grad else None, x.loss.label_smoothing)
        if need_grad:
            rows = x.normalized_rows(r0, r1) if need_bases else x.hidden[r0:r1]
            kernels.gradient_products(tile, x.bases, rows, grad_h[r0:r1] if need_hidden else None,
                                      grad_b if need_bases else None, first_rows=True, first_bases=r0 == 0)
    del buffer
    if need_bases and n == 0:
        grad_b.zero_()  # no strip ran: the gradient is zero
    return per_row, lse, grad_h, grad_b


def _column_plan(kernels: ChunkKernels, x: _Scaled, need_hidden: bool, need_bases: bool, budget: _Budget):
    """The column plan: (per-row loss, lse, accumulated hidden gradient, finished bases gradient).

    Pass 1 walks the column chunks forward and merges each chunk's lse and loss terms per row;
    pass 2 walks them backward, so its first tile is pass 1's last, still in the buffer (with all
    rows in one block that saves one chunk's GEMM)."""
    n, d, v = x.hidden.shape[0], x.hidden.shape[1], x.bases.shape[0]
    f = dict(dtype=x.acc, device=x.hidden.device)
    score_dtype = kernels.score_dtype(x.hidden.dtype)
    elements = budget.buffer_elements()
    columns = min(v, max(elements // max(n, 1), MIN_CHUNK_COLUMNS))  # all rows at once where they fit
    rows_per_block = max(1, min(max(n, 1), elements // columns))
    buffer = torch.empty(rows_per_block * columns, dtype=score_dtype, device=x.hidden.device)
    chunks = [(c0, min(v, c0 + columns)) for c0 in range(0, v, columns)]
    blocks = [(r0, min(n, r0 + rows_per_block)) for r0 in range(0, n, rows_per_block)]
    ignore, smoothing = x.loss.ignore_index, x.loss.label_smoothing

    def tile_of(r0, r1, c0, c1):
        return buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)

    def col_scale(c0, c1):
        return x.inv_b[c0:c1] if x.inv_b is not None else None

    lse, terms = torch.full((n,), float("-inf"), **f), torch.zeros(n, **f)
    resident = None  # the (chunk, block) whose scores the buffer holds
    for c0, c1 in chunks:
        for r0, r1 in blocks:
            tile = tile_of(r0, r1, c0, c1)
            x.scores(kernels, r0, r1, c0, c1, tile)
            part, chunk_lse = kernels.chunk_partials(tile, x.row_scale[r0:r1], col_scale(c0, c1), x.targets[r0:r1],
                                                     ignore, smoothing, c0, v)
            terms[r0:r1] += part
            torch.logaddexp(lse[r0:r1], chunk_lse, out=lse[r0:r1])
            resident = (c0, r0)
    per_row = torch.where(x.targets != ignore, lse + terms, 0.0)

    grad_h = torch.zeros(n, d, **f) if need_hidden else None
    db = torch.empty_like(x.bases) if need_bases else None
    one_block = len(blocks) <= 1
    native = score_dtype == x.hidden.dtype  # the GEMMs return the inputs' dtype
    rows_once = x.normalized_rows(0, n) if need_bases and one_block else None
    for c0, c1 in reversed(chunks):
        chunk = x.bases[c0:c1]
        grad_chunk, in_output = None, need_bases and (db.dtype == x.acc or (one_block and native))
        if need_bases:  # formed in the returned gradient where nothing sums into it in a narrower dtype
            grad_chunk = db[c0:c1] if in_output else torch.empty(c1 - c0, d, **f)
            if n == 0:
                grad_chunk.zero_()
        for r0, r1 in reversed(blocks):
            tile = tile_of(r0, r1, c0, c1)
            if resident != (c0, r0):
                x.scores(kernels, r0, r1, c0, c1, tile)
            resident = None
            kernels.chunk_epilogue(tile, x.row_scale[r0:r1], col_scale(c0, c1), x.targets[r0:r1], ignore,
                                   x.tile_weight[r0:r1], smoothing, lse[r0:r1], c0, v)
            rows = None
            if need_bases:
                rows = rows_once if one_block else x.normalized_rows(r0, r1)
            kernels.gradient_products(tile, chunk, rows, grad_h[r0:r1] if need_hidden else None, grad_chunk,
                                      first_rows=False, first_bases=(r0, r1) == blocks[-1])
        if need_bases:
            if x.inv_b is not None:
                kernels.normalization_backward(chunk, x.inv_b[c0:c1], grad_chunk, x.sim.eps, True,
                                               out=grad_chunk if in_output else db[c0:c1])
            elif not in_output:
                db[c0:c1] = grad_chunk
    return per_row, lse, grad_h, db


# --- GEMMs with fp32 accumulation through ATen (cuBLAS on a GPU), shared by the GPU backends -----

logger = logging.getLogger("vocabsem_fast")

# Which path each GEMM took, by "op device dtype": "out_dtype" (cuBLAS reads bf16 / fp16 and
# writes fp32 straight into the result) or "upcast" (the inputs copied to fp32 first: where
# ATen has no out_dtype= kernel, as on the CPU). The first use of each is logged, a GPU's upcast
# as a warning (it copies the bases each call); bench/gpu_check.py reports the table.
GEMM_PATHS: dict[str, str] = {}


def _fp32_result(name: str, a: Tensor, native, upcast):
    key = f"{name} {a.device.type} {str(a.dtype).removeprefix('torch.')}"
    if GEMM_PATHS.get(key) != "upcast":
        try:
            result = native()
            if key not in GEMM_PATHS:
                GEMM_PATHS[key] = "out_dtype"
                logger.info("%s: fp32 results through out_dtype=", key)
            return result
        except (TypeError, RuntimeError) as error:  # a torch or device without the out_dtype= kernel
            GEMM_PATHS[key] = "upcast"
            (logger.warning if a.device.type == "cuda" else logger.info)(
                "%s: no out_dtype= GEMM here (%s); the inputs are upcast to fp32", key, str(error).splitlines()[0])
    return upcast()


def mm_f32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation in cuBLAS for bf16 / fp16 inputs), written
    into ``out`` when given (no temporary of the result's size)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if out is None:
        return _fp32_result("mm", a, lambda: torch.mm(a, b, out_dtype=torch.float32),
                            lambda: torch.mm(a.float(), b.float()))
    return _fp32_result("mm", a, lambda: torch.mm(a, b, out_dtype=torch.float32, out=out),
                        lambda: torch.mm(a.float(), b.float(), out=out))


def bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b with an fp32 result."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    return _fp32_result("bmm", a, lambda: torch.bmm(a, b, out_dtype=torch.float32),
                        lambda: torch.bmm(a.float(), b.float()))


def add_mm_f32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b into an fp32 accumulator without an (m, n) temporary."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    _fp32_result("addmm", a, lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
                 lambda: acc.addmm_(a.float(), b.float()))


class TorchNormalization:
    """Inverse norms and the normalisation backward in torch (in place on an accumulate-dtype
    gradient): the strip pieces of every backend without norm kernels of its own."""

    def inverse_norms(self, x, eps):
        return inverse_norms(x, eps)

    def normalization_backward(self, x, inv, grad, eps, grad_times_inv, out=None):
        if out is None and grad.dtype == x.dtype:
            out = grad  # in place on the accumulated gradient
        return normalization_backward(x, inv, grad, eps, grad_times_inv=grad_times_inv, out=out)


class AtenGemms:
    """The three GEMMs of the strip algorithm on a GPU: inputs in their own dtype (tensor cores
    for bf16 / fp16), fp32 results; the gradient tile is cast to the inputs' dtype for its GEMMs.
    The GPU epilogues zero the logits of zero scales themselves (no host read)."""

    epilogue_zeroes_zero_scales = True

    def score_dtype(self, dtype):
        return accumulate_dtype(dtype)

    def scores(self, rows, bases, out):
        mm_f32(rows, bases.T, out=out)

    def gradient_products(self, tile, bases, rows, grad_rows, grad_bases, first_rows, first_bases):
        tile = tile.to(bases.dtype)  # one cast serves both GEMMs
        if grad_rows is not None:
            if first_rows:
                mm_f32(tile, bases, out=grad_rows)
            else:
                add_mm_f32(grad_rows, tile, bases)
        if grad_bases is not None:
            if first_bases:
                grad_bases.zero_()
            add_mm_f32(grad_bases, tile.T, rows)


def merge_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k best of its candidates (rows, m), sorted descending; an empty slot (index
    -1) never wins a tie with a real candidate, and equal values keep their candidate order."""
    real_first = torch.argsort((indices < 0).to(torch.uint8), dim=1, stable=True)
    values, indices = values.gather(1, real_first), indices.gather(1, real_first)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)
