"""The backend registry and the ``impl=`` selector.

``REGISTRY`` is the one table of backends, fastest first: a name, why it cannot run here (or
None), and how to build it. Each backend declares what it runs in its ``Capabilities``
(``interface.py``). Two rules pick what runs a call:

* ``resolve(impl, device)``: "auto" takes the first available backend for the tensors' device
  (cuda, triton, torch on a GPU; cpu, torch on the CPU); an explicit backend that cannot run
  there raises ``RuntimeError`` saying why;
* ``select(name, op, ...)``, the one fallback policy: the resolved backend runs the op when its
  capabilities cover it (device, dtype, k), otherwise the ``torch`` backend does.

Adding a backend: a module with a ``Backend`` subclass declaring its ``Capabilities``, and one
row in ``REGISTRY``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .chunked import TorchBackend
from .interface import Backend, Capabilities


def _import_extension():
    """The private C++ module, or the reason it cannot be imported."""
    try:
        from .. import _C  # noqa: PLC0415
    except ImportError as exc:  # not built (e.g. VOCABSEM_NO_EXTENSION=1) or built for another torch
        return None, f"the C++ extension vocabsem_fast._C is not importable ({exc})"
    return _C, None


# Imported once, here, rather than behind functools.cache: torch.compile traces resolve() on every
# call of a public function, and reads a module constant without tracing an import or a cache
# wrapper (which dynamo bypasses with a "silent incorrectness" warning).
_EXTENSION, _EXTENSION_REASON = _import_extension()
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1" and not torch.cuda.is_available()


def _cuda_reason() -> str | None:
    if _EXTENSION is None:
        return _EXTENSION_REASON
    if not getattr(_EXTENSION, "with_cuda", False):
        return "vocabsem_fast._C was built without CUDA (needs a CUDA build of torch and nvcc)"
    return None


def _triton_reason() -> str | None:
    """Triton runs on a CUDA GPU, or on the CPU under its interpreter (TRITON_INTERPRET=1, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if TRITON_INTERPRETING or torch.cuda.is_available():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"


def _build_cpu() -> Backend:
    from .cpu import CpuBackend  # noqa: PLC0415

    return CpuBackend(_EXTENSION)


def _build_cuda() -> Backend:
    from .cuda import CudaBackend  # noqa: PLC0415

    return CudaBackend(_EXTENSION)


def _build_triton() -> Backend:
    from .triton import TritonBackend  # noqa: PLC0415

    return TritonBackend()


@dataclass(frozen=True)
class Entry:
    name: str
    devices: tuple[str, ...]             # device types "auto" considers it for
    reason: str | None                   # why it cannot run here (None: it can)
    build: Callable[[], Backend]


REGISTRY: tuple[Entry, ...] = (
    Entry("cuda", ("cuda",), _cuda_reason(), _build_cuda),
    Entry("triton", ("cuda",), _triton_reason(), _build_triton),
    Entry("cpu", ("cpu",), _EXTENSION_REASON, _build_cpu),
    Entry("torch", ("cpu", "cuda"), None, TorchBackend),
)
_ENTRIES = {entry.name: entry for entry in REGISTRY}
IMPLS = ("auto", *_ENTRIES)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can."""
    if name not in _ENTRIES:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    return _ENTRIES[name].reason


def available_backends() -> list[str]:
    """Names of the backends usable here, fastest first (``"torch"`` is always among them)."""
    return [entry.name for entry in REGISTRY if entry.reason is None]


def resolve(impl: str, device: torch.device) -> str:
    """The backend that runs for ``impl`` on tensors of ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return next(e.name for e in REGISTRY if e.reason is None and device.type in e.devices)
    reason = _ENTRIES[impl].reason
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} is not available: {reason}")
    if impl == "triton" and TRITON_INTERPRETING and device.type == "cpu":
        return impl  # the interpreter runs Triton kernels on CPU tensors
    if device.type not in _ENTRIES[impl].devices:
        kind = "CPU" if impl == "cpu" else "CUDA"
        raise RuntimeError(f"impl={impl!r} runs on {kind} tensors only; the inputs are on {device}")
    return impl


@functools.cache
def get(name: str) -> Backend:
    """The backend object behind a resolved name."""
    entry = _ENTRIES.get(name)
    if entry is None:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    if entry.reason is not None:
        raise RuntimeError(f"impl={name!r} is not available: {entry.reason}")
    return entry.build()


def select(name: str, op: str, device: torch.device, dtype: torch.dtype, *, k: int | None = None,
           scale: float | None = None) -> Backend:
    """The backend that runs ``op`` for the resolved backend ``name``: itself when its
    capabilities cover the call, else the torch backend (the one fallback policy)."""
    backend = get(name)
    if backend.capabilities.covers(op, device, dtype, k=k, scale=scale):
        return backend
    return get("torch")


__all__ = ["IMPLS", "REGISTRY", "Backend", "Capabilities", "available_backends", "get", "resolve", "select",
           "unavailable_reason"]
