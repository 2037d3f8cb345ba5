"""The chunked backends never hold an N x V tensor.

A TorchDispatchMode records the numel of every tensor that any aten op produces (other than a
view of its own inputs) during the public calls, including the ops that run inside the
vocabsem_fast custom ops and the ATen calls of the C++ kernels (which go through the
dispatcher). The largest must be bounded by the work tile and the sizes of the inputs and
gradients, far below N * V; the same recorder run on ``vocabsem_fast.reference`` sees the N x V
logits, so the check can fail. (Memory a C++ kernel takes without ATen, e.g. a std::vector, is
invisible to it.)

N = 256 rather than 64: the (V, d) gradient of the bases is d / N times N * V (0.52 at N = 64,
0.13 here), so a bound of max(tile, input and gradient sizes) is clearly separated from N * V.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vocabsem_fast as vf
from vocabsem_fast import reference as ref
from vocabsem_fast.backends.tiles import tile_config

from helpers import BACKENDS, make, make_targets

N, D, V = 256, 33, 20011
TILE = 64 * 256  # max_elements: a tile of 256 rows x 64 columns
TOPK = 5


def _loss_tile(impl: str) -> int:
    """The cross-entropy workspace: a chunked tile, or for the C++ backend a row strip of
    STRIP_TILES tiles (rows x V, bounded the same way, never N x V)."""
    from vocabsem_fast.backends.cpu import STRIP_TILES

    return TILE * STRIP_TILES if impl == "cpu" else TILE


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class NumelRecorder(TorchDispatchMode):
    """Records the numel of every tensor an op allocates while active (outputs that are views of
    the op's inputs are not new memory and are not counted).

    A custom op of vocabsem_fast is run by calling its CompositeExplicitAutograd kernel with this
    mode pushed again, so the aten ops inside it are recorded as well (a dispatch mode is
    otherwise inactive inside its own ``__torch_dispatch__``)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []
        self.custom_ops: list[str] = []
        self.inner_numels: list[int] = []  # produced inside a vocabsem_fast op
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vocabsem_fast":
            self.custom_ops.append(func.name())
            self._depth += 1
            try:
                with self:
                    out = func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
            finally:
                self._depth -= 1
        else:
            out = func(*args, **kwargs)
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            # A view of an input (a slice, a transpose, an out= argument) allocates nothing.
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in inputs:
                self.numels.append(t.numel())
                if self._depth:
                    self.inner_numels.append(t.numel())
        return out

    @property
    def peak(self) -> int:
        return max(self.numels, default=0)


def _inputs():
    return make(N, D, requires_grad=True), make(V, D, requires_grad=True)


def _check_bounded(rec: NumelRecorder, bound: int, what: str) -> None:
    assert rec.custom_ops, f"{what}: no vocabsem_fast op was seen"
    # The recorder sees inside the ops: their work tensors are there, not just their small outputs.
    assert max(rec.inner_numels, default=0) >= TILE // 2, f"{what}: the ops inside the custom op were not recorded"
    assert rec.peak <= bound, f"{what}: an intermediate of {rec.peak} elements > bound {bound}"
    assert rec.peak <= N * V // 4, f"{what}: an intermediate of {rec.peak} elements is close to N x V = {N * V}"


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_forward_backward_is_bounded(impl, label_smoothing):
    hidden, bases = _inputs()
    targets = make_targets((N,), V)
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        loss = vf.similarity_cross_entropy(hidden, bases, targets, scale=10.0, label_smoothing=label_smoothing,
                                           impl=impl)
        loss.backward()
    # Work tiles (or a strip of one row against all of V), O(N + V) vectors (norms, running
    # max/sum, lse), and tensors the size of the inputs and of their gradients (which a backend
    # may form in the forward pass of a reduced loss, or in the backward).
    _check_bounded(rec, max(_loss_tile(impl), N * D, V * D), "forward + backward")
    assert hidden.grad.shape == hidden.shape and bases.grad.shape == bases.shape


@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_forward_without_gradients_is_bounded(impl):
    """Without gradients there is nothing of the bases' size either: tiles, (N, d) row data and
    O(N + V) vectors only (a normalised copy of the bases would be V x d)."""
    hidden, bases = _inputs()
    targets = make_targets((N,), V)
    rec = NumelRecorder()
    with torch.no_grad(), tile_config(max_elements=TILE), rec:
        vf.similarity_cross_entropy(hidden, bases, targets, label_smoothing=0.1, impl=impl)
    _check_bounded(rec, max(_loss_tile(impl), N * D, V), "forward")


@pytest.mark.parametrize("impl", BACKENDS)
def test_cross_entropy_with_leading_dims_and_none_reduction_is_bounded(impl):
    hidden, bases = make(4, N // 4, D, requires_grad=True), make(V, D, requires_grad=True)
    targets = make_targets((4, N // 4), V)
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        vf.similarity_cross_entropy(hidden, bases, targets, reduction="none", impl=impl).sum().backward()
    _check_bounded(rec, max(_loss_tile(impl), V * D, N * D), "forward + backward")


@pytest.mark.parametrize("impl", BACKENDS)
def test_topk_forward_and_backward_are_bounded(impl):
    hidden, bases = _inputs()
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        values, _ = vf.similarity_topk(hidden, bases, TOPK, impl=impl)
    # A tile, plus the running top-k merged with one chunk's top-k: (rows, 2k).
    # A tile, the running top-k merged with one chunk's (rows, 2k), O(N + V) vectors.
    _check_bounded(rec, max(TILE, N * D, V), "top-k forward")
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        values.sum().backward()
    _check_bounded(rec, max(TILE, V * D, N * D), "top-k backward")


@pytest.mark.parametrize("impl", BACKENDS)
def test_hard_assign_is_bounded(impl):
    points, centroids = make(N, D), make(V, D)
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        indices, scores = vf.assign(points, centroids, hard=True, impl=impl)
    _check_bounded(rec, max(TILE, N * D, V), "hard assign")
    assert indices.shape == scores.shape == (N,)


def test_reference_exceeds_the_bound():
    """The same recorder on the materialising reference sees the N x V logits: the checks above
    can fail."""
    hidden, bases = _inputs()
    targets = make_targets((N,), V)
    rec = NumelRecorder()
    with rec:
        ref.similarity_cross_entropy(hidden, bases, targets).backward()
    assert rec.peak >= N * V > 2 * max(TILE, V * D, N * D)
    rec = NumelRecorder()
    with rec:
        ref.similarity_topk(hidden.detach(), bases.detach(), TOPK)
    assert rec.peak >= N * V
    rec = NumelRecorder()
    with rec:
        ref.assign(hidden.detach(), bases.detach(), hard=True)
    assert rec.peak >= N * V


@pytest.mark.parametrize("impl", BACKENDS)
def test_recorder_sees_a_materialising_custom_op(impl):
    """similarity_logits returns N x V by definition: the recorder reports it through the custom op."""
    hidden, bases = _inputs()
    rec = NumelRecorder()
    with tile_config(max_elements=TILE), rec:
        vf.similarity_logits(hidden.detach(), bases.detach(), impl=impl)
    assert rec.peak == N * V and N * V in rec.inner_numels
