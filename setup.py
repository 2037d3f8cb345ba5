"""Builds the private extension ``vocabsem_fast._C`` from ``csrc/``.

C++ (ATen + OpenMP) is always built. CUDA sources under ``csrc/cuda`` are added only when the
installed torch has CUDA and nvcc is found (or ``VOCABSEM_FORCE_CUDA=1``; ``VOCABSEM_NO_CUDA=1``
leaves them out, as the GPU check's fallback build does); a CPU-only install never needs them.
``VOCABSEM_CUDA_ARCHS`` (default ``80;90``) names the architectures built. ``VOCABSEM_NO_EXTENSION=1``
skips the extension entirely (the pure-torch backend still works).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["vocabsem_fast", "vocabsem_fast.backends", "vocabsem_fast.app", "vocabsem_fast.kernels"]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda() -> bool:
    if os.environ.get("VOCABSEM_NO_CUDA") == "1":
        return False
    if os.environ.get("VOCABSEM_FORCE_CUDA") == "1":
        return True
    import torch

    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    )


def _extensions():
    if os.environ.get("VOCABSEM_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = []
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if cuda_sources and _want_cuda():
        archs = os.environ.get("VOCABSEM_CUDA_ARCHS", "80;90").split(";")
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        define_macros.append(("VOCABSEM_WITH_CUDA", None))
        ext = CUDAExtension(
            "vocabsem_fast._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "vocabsem_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
