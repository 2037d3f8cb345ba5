"""The list of compiled Triton variants covers what the launchers can select, and each entry
compiles ahead of time for a GPU this machine does not have (a sample here; CI compiles all)."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _modules():
    from vocabsem_fast.kernels import similarity, variants  # noqa: PLC0415  (imports triton)

    return similarity, variants


def test_names_are_unique_and_signatures_name_every_argument():
    _, variants = _modules()
    listed = variants.variants()
    assert len({v.name for v in listed}) == len(listed)
    for v in listed:
        assert list(v.signature) == list(v.kernel.arg_names), v.name
        assert all(v.signature[name] == "constexpr" for name in v.constexprs), v.name
        assert set(v.options) == {"num_warps", "num_stages"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_launcher_choice_is_listed(dtype):
    """What the launchers select on a GPU for any input (dtype, normalise, smoothing, row count,
    gradients, every top-k k and soft-assignment width) is among the variants."""
    similarity, variants = _modules()
    listed = {(v.kernel.__name__, tuple(sorted({**v.constexprs, **v.options}.items()))) for v in variants.variants()}

    def key(kernel, constexprs, config):
        return kernel.__name__, tuple(sorted({**constexprs, **config}.items()))

    for normalize, smooth, n in itertools.product((True, False), (True, False), (1, 16, 17, 8192)):
        constexprs = similarity.forward_constexprs(dtype, normalize, smooth, interpreting=False)
        assert key(similarity._ce_forward_kernel, constexprs, similarity.forward_config(n, dtype)) in listed
        for k in range(1, similarity.MAX_TOPK + 1):  # every k the fused top-k takes
            constexprs = similarity.topk_constexprs(dtype, normalize, k, interpreting=False)
            assert key(similarity._topk_kernel, constexprs, similarity.topk_config(n, dtype)) in listed, k
    for normalize, k in itertools.product((True, False), range(1, similarity.MAX_SOFT_ASSIGN_K + 1)):
        constexprs = similarity.soft_assign_constexprs(dtype, normalize, k, interpreting=False)
        assert key(similarity._soft_assign_kernel, constexprs, similarity.soft_assign_config(k)) in listed, k
    for col_scale, smooth, grad in itertools.product((True, False), repeat=3):
        constexprs = similarity.epilogue_constexprs(col_scale, smooth, grad)
        assert key(similarity._strip_epilogue_kernel, constexprs, similarity.EPILOGUE) in listed


@pytest.mark.parametrize("arch", [80, 90])
def test_a_bf16_forward_compiles_for_the_gpu_on_tensor_cores(arch):
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    _, variants = _modules()
    v = next(x for x in variants.variants() if x.name == "ce_forward[bf16,normalize,rows64]")
    compiled = triton.compile(ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs,
                                        attrs=v.attrs()), target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    ptx = compiled.asm["ptx"]
    assert ("wgmma.mma_async" in ptx) if arch == 90 else ("mma.sync" in ptx)
