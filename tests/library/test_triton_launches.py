"""Every Triton launch, intercepted (no GPU, no interpreter): its grid within CUDA's limits at
any batch, and every launch made under the inputs' device, not the current one."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

AXIS0_LIMIT, AXES12_LIMIT = 2**31 - 1, 65535  # CUDA's grid limits


@pytest.fixture
def launches(monkeypatch):
    """Replaces every kernel of ``kernels.similarity`` by a recorder of (kernel, grid, guarded
    device) and its device guard by one that notes the device it was entered for."""
    from vocabsem_fast.kernels import similarity

    record, guard = [], []

    @contextlib.contextmanager
    def on_device(tensor):
        guard.append(tensor.device)
        try:
            yield
        finally:
            guard.pop()

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                record.append((self.name, tuple(grid), guard[-1] if guard else None))
            return launch

    monkeypatch.setattr(similarity, "on_device", on_device)
    for name in ("_ce_forward_kernel", "_topk_kernel", "_strip_epilogue_kernel", "_soft_assign_kernel"):
        monkeypatch.setattr(similarity, name, Recorder(name))
    return similarity, record


def _assert_within_limits(record):
    for name, grid, _ in record:
        assert 1 <= grid[0] <= AXIS0_LIMIT, (name, grid)
        assert all(1 <= g <= AXES12_LIMIT for g in grid[1:]), (name, grid)


@pytest.mark.parametrize("batch", [1, 65535, 65536, 131071, 131072])
def test_batched_launches_keep_grid_axes_1_and_2_within_65535(launches, batch):
    similarity, record = launches
    points, centroids = torch.randn(batch, 1, 2), torch.randn(batch, 3, 2)
    values, indices = similarity.batched_topk(points, centroids, None, None, 1.0, 1)
    assert values.shape == indices.shape == (batch, 1, 1)
    topk = [grid for name, grid, _ in record if name == "_topk_kernel"]
    assert sum(grid[2] for grid in topk) == batch  # the chunks cover the batch once
    record.clear()
    probs = similarity.soft_assign(points, centroids, None, None, 1.0)
    assert probs.shape == (batch, 1, 3)
    assign = [grid for name, grid, _ in record if name == "_soft_assign_kernel"]
    assert sum(grid[1] for grid in assign) == batch
    _assert_within_limits(record)


@pytest.mark.parametrize("batch, limit, expected", [
    (0, 3, []), (1, 3, [(0, 1)]), (3, 3, [(0, 3)]), (4, 3, [(0, 3), (3, 4)]), (7, 3, [(0, 3), (3, 6), (6, 7)]),
])
def test_batch_chunks_cover_the_batch(batch, limit, expected):
    from vocabsem_fast.kernels import similarity

    assert similarity.batch_chunks(batch, limit) == expected
    assert similarity.batch_chunks(65536) == [(0, 65535), (65535, 65536)]


def test_every_launcher_launches_under_its_inputs_device(launches):
    similarity, record = launches
    n, d, v = 5, 7, 300
    hidden, bases, targets = torch.randn(n, d), torch.randn(v, d), torch.randint(0, v, (n,))
    inv_h, inv_b = torch.rand(n), torch.rand(v)
    similarity.cross_entropy_forward(hidden, bases, targets, inv_h, inv_b, 2.0, -100, 0.0)
    similarity.topk(hidden, bases, inv_h, inv_b, 2.0, 3)
    similarity.strip_epilogue(torch.randn(n, v), torch.rand(n), torch.rand(v), targets, -100, None, 0.0)
    similarity.soft_assign(hidden[None], bases[None, :9], None, None, 1.0)
    assert {name for name, _, _ in record} == {"_ce_forward_kernel", "_topk_kernel", "_strip_epilogue_kernel",
                                               "_soft_assign_kernel"}
    assert all(device == hidden.device for _, _, device in record), record


def test_the_guard_selects_the_tensors_gpu(monkeypatch):
    """The guard is torch.cuda.device(tensor.device) for a CUDA tensor, and nothing on the CPU."""
    from vocabsem_fast.kernels import similarity

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    with similarity.on_device(OnSecondGpu()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with similarity.on_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
