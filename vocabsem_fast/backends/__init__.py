"""Backend registry and the ``impl=`` selector.

Backends, fastest first for their device:

* ``cuda``   CUDA C++ kernels in ``vocabsem_fast._C`` (GPU)
* ``triton`` Triton kernels in ``vocabsem_fast.kernels`` (GPU)
* ``cpu``    C++ kernels in ``vocabsem_fast._C`` (CPU)
* ``torch``  the chunked pure-torch algorithm, on any device

``"auto"`` takes the first available backend for the tensors' device; an explicit backend that
cannot run raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import functools

import torch

from .chunked import ChunkedBackend, torch_row_norms

IMPLS = ("auto", "cuda", "triton", "cpu", "torch")
_GPU_ORDER = ("cuda", "triton", "torch")
_CPU_ORDER = ("cpu", "torch")


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
_EXTENSION = _import_extension()


def _triton_reason() -> str | None:
    """Triton runs on a CUDA GPU, or on the CPU under its interpreter (TRITON_INTERPRET=1, for tests)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"


_TRITON_REASON = _triton_reason()
TRITON_INTERPRETING = _TRITON_REASON is None and not torch.cuda.is_available()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can."""
    if name == "torch":
        return None
    if name == "cpu":
        return _EXTENSION[1]
    if name == "triton":
        return _TRITON_REASON
    if name == "cuda":
        ext, reason = _EXTENSION
        if ext is None:
            return reason
        if not getattr(ext, "with_cuda", False):
            return "vocabsem_fast._C was built without CUDA (needs a CUDA build of torch and nvcc)"
        return None
    raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")


def available_backends() -> list[str]:
    """Names of the backends usable here, fastest first (``"torch"`` is always among them)."""
    return [name for name in ("cuda", "triton", "cpu", "torch") if unavailable_reason(name) is None]


def resolve(impl: str, device: torch.device) -> str:
    """The backend that runs for ``impl`` on tensors of ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    gpu = device.type == "cuda"
    if impl == "auto":
        order = _GPU_ORDER if gpu else _CPU_ORDER
        return next(name for name in order if unavailable_reason(name) is None)
    reason = unavailable_reason(impl)
    if reason is not None:
        raise RuntimeError(f"impl={impl!r} is not available: {reason}")
    if impl == "cpu" and device.type != "cpu":
        raise RuntimeError(f"impl='cpu' runs on CPU tensors only; the inputs are on {device}")
    if impl == "triton" and TRITON_INTERPRETING:
        return impl  # the interpreter runs Triton kernels on CPU tensors
    if impl in ("cuda", "triton") and not gpu:
        raise RuntimeError(f"impl={impl!r} runs on CUDA tensors only; the inputs are on {device}")
    return impl


@functools.cache
def get(name: str):
    """The backend object behind a resolved name."""
    if name == "torch":
        return ChunkedBackend("torch", torch_row_norms)
    if name == "cpu":
        ext, reason = _EXTENSION
        if ext is None:
            raise RuntimeError(f"impl='cpu' is not available: {reason}")
        from .cpu import CpuBackend  # noqa: PLC0415

        return CpuBackend(ext)
    if name == "cuda" and unavailable_reason("cuda") is None:
        from .cuda import CudaBackend  # noqa: PLC0415

        return CudaBackend(_EXTENSION[0])
    if name == "triton" and _TRITON_REASON is None:
        from .triton import TritonBackend  # noqa: PLC0415

        return TritonBackend()
    raise RuntimeError(f"impl={name!r} is not available: {unavailable_reason(name)}")
