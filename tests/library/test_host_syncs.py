"""No op reads tensor data on the host off the CPU: such a read waits for every queued kernel and
breaks CUDA-graph capture (``torch.compile(mode="reduce-overhead")``).

The one read the contract costs, the target-range check's ``ValueError`` on a GPU, is left out
with ``VOCABSEM_SYNC_FREE=1`` and during CUDA-graph capture (a device assertion instead): the
tests run with it set. On a CUDA machine ``torch.cuda.set_sync_debug_mode("error")`` turns every
synchronising call into an error (``test_no_host_sync_on_the_gpu``). On the CPU the same paths run with
``host_reads_are_free`` answering False (what it answers off the CPU) while every read of a
tensor's values on the host is counted: ``bool()``, ``item()``, ``int()`` / ``float()``,
``tolist()``, ``nonzero()``, ``numpy()`` and indexing by a boolean mask. The torch backend runs
the public ops (and so the glue every backend shares); the cuda backend's orchestration runs on the
torch model of its kernels; the cpu backend is left out (its kernels run on the CPU only, where
host reads are free)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_cuda_backend_logic import KernelModel

import vocabsem_fast as vs
from vocabsem_fast import _validation
from vocabsem_fast.backends import chunked
from vocabsem_fast.backends import cuda as cuda_module
from vocabsem_fast.backends.cuda import CudaBackend
from vocabsem_fast.options import LossOptions, SimilarityOptions

from helpers import make, make_targets

_READS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist", "nonzero", "numpy")


class HostReads:
    """Counts reads of tensor values on the host while active (names and where they happened)."""

    def __init__(self, monkeypatch):
        self.seen: list[str] = []
        self._monkeypatch = monkeypatch

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if self.active:
                self.seen.append(name)
            return original(tensor, *args, **kwargs)
        return wrapper

    def _counting_getitem(self, original):
        def getitem(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.seen.append("boolean-mask indexing")
            return original(tensor, index)
        return getitem

    @contextlib.contextmanager
    def counting(self):
        self.active = False
        for name in _READS:
            self._monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        self._monkeypatch.setattr(torch.Tensor, "__getitem__", self._counting_getitem(torch.Tensor.__getitem__))
        for module in (_validation, chunked):  # the paths taken off the CPU
            self._monkeypatch.setattr(module, "host_reads_are_free", lambda x: False)
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    @contextlib.contextmanager
    def paused(self):
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


class _KernelsUnobserved:
    """The torch model of the CUDA kernels, its reads not counted: a kernel reads its data on the
    device (the model's loops read it on the host only to model that)."""

    def __init__(self, model, reads: HostReads):
        self._model, self._reads = model, reads

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._reads.paused():
                return attr(*args, **kwargs)
        return call


@pytest.fixture
def host_reads(monkeypatch):
    monkeypatch.delenv("VOCABSEM_DEBUG", raising=False)
    monkeypatch.setenv("VOCABSEM_SYNC_FREE", "1")  # the target check's host read is then off too
    return HostReads(monkeypatch)


def _leaf(x):
    return x.clone().requires_grad_(True)


LOSS_CASES = {  # normalize, scale, reduction, label smoothing, z-loss, class weights
    "cosine-mean": (True, 20.0, "mean", 0.0, 0.0, False),
    "cosine-sum-smooth-weighted": (True, 20.0, "sum", 0.1, 1e-3, True),
    "cosine-large-scale-none": (True, 90.0, "none", 0.0, 0.0, False),
    "raw-mean": (False, 1.0, "mean", 0.0, 0.0, False),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_cross_entropy_reads_nothing_on_the_host(host_reads, case):
    normalize, scale, reduction, smoothing, z_loss, weighted = LOSS_CASES[case]
    h, b = _leaf(make(29, 17) * 40), _leaf(make(301, 17))
    targets = make_targets((29,), 301)
    weight = torch.rand(301) + 0.5 if weighted else None
    with host_reads.counting():
        loss, lse = vs.similarity_cross_entropy(h, b, targets, scale=scale, normalize=normalize, reduction=reduction,
                                                label_smoothing=smoothing, z_loss=z_loss, weight=weight,
                                                return_lse=True, impl="torch")
        (loss.sum() + lse.sum()).backward()
    assert host_reads.seen == [], f"host reads in the cross-entropy ({case}): {host_reads.seen}"


def test_bad_targets_are_still_caught_off_the_host(host_reads):
    """Sync-free, the range check is an assertion on the device: it still fails (here, where the
    device is the CPU, at once)."""
    h, b = make(5, 8), make(40, 8)
    targets = torch.tensor([0, 1, 40, 2, 3])
    with host_reads.counting(), pytest.raises(RuntimeError, match="targets must lie in"):
        vs.similarity_cross_entropy(h, b, targets, impl="torch")
    assert host_reads.seen == []


@pytest.mark.parametrize("setting", ["default", "debug", "capturing"])
def test_the_target_check_off_the_cpu(host_reads, monkeypatch, setting):
    """By default (and with VOCABSEM_DEBUG=1 over VOCABSEM_SYNC_FREE) a GPU call keeps the
    contract's ValueError at the cost of one host read; while a CUDA graph is captured it is a
    device assertion, with no read."""
    if setting == "default":
        monkeypatch.delenv("VOCABSEM_SYNC_FREE")
    elif setting == "debug":
        monkeypatch.setenv("VOCABSEM_DEBUG", "1")
    else:
        monkeypatch.delenv("VOCABSEM_SYNC_FREE")
        monkeypatch.setattr(_validation, "_capturing", lambda x: True)
    h, b = make(5, 8), make(40, 8)
    with host_reads.counting():
        vs.similarity_cross_entropy(h, b, torch.tensor([0, 1, 39, 2, -100]), impl="torch")
        reads = list(host_reads.seen)
        error = RuntimeError if setting == "capturing" else ValueError
        with pytest.raises(error, match="targets must lie in"):
            vs.similarity_cross_entropy(h, b, torch.tensor([0, 1, 40, 2, 3]), impl="torch")
    assert reads == ([] if setting == "capturing" else ["__bool__"])


def test_similarity_ops_read_nothing_on_the_host(host_reads):
    h, b = _leaf(make(23, 13)), _leaf(make(211, 13))
    points, centroids = _leaf(make(3, 19, 13)), _leaf(make(3, 7, 13))
    with host_reads.counting():
        values, _ = vs.similarity_topk(h, b, k=5, impl="torch")
        values.sum().backward()
        vs.assign(points, centroids, hard=True, impl="torch")
        vs.assign(points, centroids, temperature=0.5, impl="torch").sum().backward()
        vs.similarity_logits(h, b, impl="torch").sum().backward()
    assert host_reads.seen == [], f"host reads in the similarity ops: {host_reads.seen}"


@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_orchestration_reads_nothing_on_the_host(host_reads, monkeypatch, normalize):
    monkeypatch.setattr(cuda_module, "STRIP_ELEMENTS", 700)  # several strips of rows
    monkeypatch.setattr(cuda_module, "MIN_SPLIT_COLUMNS", 7)
    backend = CudaBackend(_KernelsUnobserved(KernelModel(), host_reads))
    h, b = make(37, 11) * 1e30, make(97, 11)  # overflowing norms too: zero scales, no host read finds them
    targets = make_targets((37,), 97)
    sim = SimilarityOptions(20.0 if normalize else 0.5, normalize, 1e-12)
    points, centroids = make(3, 17, 11), make(3, 9, 11)
    with host_reads.counting():
        backend.cross_entropy(h, b, targets, sim, LossOptions(-100, 0.1), torch.ones(37), True, True)
        backend.topk(h, b, 4, sim)
        backend.batched_argmax(points, centroids, sim)
        backend.soft_assign(points, centroids, sim)
    assert host_reads.seen == [], f"host reads in the cuda orchestration: {host_reads.seen}"


def test_the_counter_sees_host_reads(host_reads):
    """The stand-in is not blind: each kind of read it names is counted."""
    x = torch.arange(6.0)
    with host_reads.counting():
        bool(x.any()), x[2].item(), x.tolist(), x[x > 2], x.nonzero()
    assert host_reads.seen == ["__bool__", "item", "tolist", "boolean-mask indexing", "nonzero"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU stand-in runs above)")
@pytest.mark.parametrize("impl", [i for i in ("torch", "triton", "cuda")])
def test_no_host_sync_on_the_gpu(impl, monkeypatch):
    from vocabsem_fast import backends

    monkeypatch.setenv("VOCABSEM_SYNC_FREE", "1")

    if backends.unavailable_reason(impl) is not None:
        pytest.skip(f"{impl} backend not available: {backends.unavailable_reason(impl)}")
    h, b = _leaf(make(29, 64).cuda()), _leaf(make(1001, 64).cuda())
    targets = make_targets((29,), 1001).cuda()
    points, centroids = make(3, 19, 64).cuda(), make(3, 7, 64).cuda()
    vs.similarity_cross_entropy(h, b, targets, impl=impl)  # first calls compile and cache: not timed here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vs.similarity_cross_entropy(h, b, targets, scale=20.0, label_smoothing=0.1, impl=impl).backward()
        vs.similarity_topk(h, b, k=5, impl=impl)
        vs.assign(points, centroids, hard=True, impl=impl)
        vs.assign(points, centroids, temperature=0.5, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_the_loss_is_captured_in_a_cuda_graph(impl, monkeypatch):
    """Default settings: inside a capture the target check turns into a device assertion, so the
    loss (forward, no gradients) records into a CUDA graph and its replay matches an eager call."""
    from vocabsem_fast import backends

    if backends.unavailable_reason(impl) is not None:
        pytest.skip(f"{impl} backend not available: {backends.unavailable_reason(impl)}")
    monkeypatch.delenv("VOCABSEM_SYNC_FREE", raising=False)
    h, b = make(29, 64).cuda(), make(1001, 64).cuda()
    targets = make_targets((29,), 1001).cuda()
    with torch.no_grad():
        expected = vs.similarity_cross_entropy(h, b, targets, scale=20.0, impl=impl)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
            vs.similarity_cross_entropy(h, b, targets, scale=20.0, impl=impl)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = vs.similarity_cross_entropy(h, b, targets, scale=20.0, impl=impl)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)
