"""Every compiled variant of the Triton kernels: kernel, signature, constexprs and launch options.

A variant is what the launchers in ``similarity.py`` can select on a GPU: each input dtype, each
constexpr branch (normalise, label smoothing, gradients, the few-rows configuration, top-k k,
soft-assignment width) with the configuration the launcher uses. The ahead-of-time compile check
(``scripts/check_gpu_kernels.py``), a warm-up and any outside check compile this same list.

Integer arguments that are sizes of the hidden dimension, strides and split widths, and every
pointer, are declared 16-divisible, as Triton specialises them at run time for aligned tensors
with d a multiple of 16 (every model shape the package targets).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from . import similarity as s

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_POINTER = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# one k for each K_PAD the top-k launcher can pick (k is a run-time argument up to K_PAD)
TOPK_KS = tuple(2**i for i in range(s.MAX_TOPK.bit_length()) if 2**i <= s.MAX_TOPK)
# one k for each tile width the soft assignment can pick (16 is the narrowest)
SOFT_ASSIGN_KS = tuple(w for w in (16, 32, 64, 128, 256, 512) if w <= s.MAX_SOFT_ASSIGN_K)
_ALIGNED = {"D", "stride_h", "stride_b", "split_cols", "ld"}


@dataclass(frozen=True)
class Variant:
    name: str                      # e.g. "ce_forward[bf16,normalize,smooth,rows64]"
    kernel: object                 # the @triton.jit function
    signature: dict[str, str]      # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, object]
    options: dict[str, int]        # num_warps, num_stages
    aligned: tuple[str, ...] = field(default=())  # arguments declared 16-divisible

    def attrs(self) -> dict:
        """The ``attrs`` of ``triton.compiler.ASTSource``: 16-divisibility of the aligned arguments."""
        names = self.kernel.arg_names
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.aligned}


def _signature(kernel, dtype: str, constexprs: dict, pointers: dict[str, str], floats: set[str]) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _variant(name, kernel, dtype, constexprs, config, pointers, floats) -> Variant:
    options = {k: config[k] for k in ("num_warps", "num_stages")}
    blocks = {k: v for k, v in config.items() if k not in options}
    constexprs = {**constexprs, **blocks}
    signature = _signature(kernel, dtype, constexprs, pointers, floats)
    aligned = tuple(a for a in signature if signature[a].startswith("*") or a in _ALIGNED)
    return Variant(name, kernel, signature, constexprs, options, aligned)


def _flag(on: bool, word: str) -> list[str]:
    return [word] if on else []


def variants() -> list[Variant]:
    """All variants, in a stable order."""
    out = []
    for dt, normalize in itertools.product(DTYPES, (True, False)):
        inputs = {"h_ptr": _POINTER[dt], "b_ptr": _POINTER[dt], "t_ptr": "*i64", "idx_ptr": "*i64",
                  "p_ptr": _POINTER[dt], "c_ptr": _POINTER[dt]}
        for smooth, few in itertools.product((False, True), (False, True)):
            config = s.forward_config(1 if few else s.FEW_ROWS + 1, DTYPES[dt])
            tags = [dt, *_flag(normalize, "normalize"), *_flag(smooth, "smooth"), f"rows{config['BLOCK_N']}"]
            out.append(_variant(f"ce_forward[{','.join(tags)}]", s._ce_forward_kernel, dt,
                                s.forward_constexprs(DTYPES[dt], normalize, smooth, interpreting=False), config,
                                inputs, {"scale"}))
        topk_configs = {id(c): c for c in (s.topk_config(1, DTYPES[dt]), s.topk_config(s.FEW_ROWS + 1, DTYPES[dt]))}
        for k, config in itertools.product(TOPK_KS, topk_configs.values()):
            tags = [dt, *_flag(normalize, "normalize"), f"kpad{k}", f"rows{config['BLOCK_N']}"]
            out.append(_variant(f"topk[{','.join(tags)}]", s._topk_kernel, dt,
                                s.topk_constexprs(DTYPES[dt], normalize, k, interpreting=False), config, inputs,
                                {"scale"}))
        for k in SOFT_ASSIGN_KS:
            tags = [dt, *_flag(normalize, "normalize"), f"k{k}"]
            out.append(_variant(f"soft_assign[{','.join(tags)}]", s._soft_assign_kernel, dt,
                                s.soft_assign_constexprs(DTYPES[dt], normalize, k, interpreting=False),
                                s.soft_assign_config(k), inputs, {"scale"}))
    for col_scale, smooth, grad in itertools.product((True, False), repeat=3):
        tags = ["fp32", *_flag(col_scale, "normalize"), *_flag(smooth, "smooth"), *_flag(grad, "grad")]
        out.append(_variant(f"strip_epilogue[{','.join(tags)}]", s._strip_epilogue_kernel, "fp32",
                            s.epilogue_constexprs(col_scale, smooth, grad), s.EPILOGUE, {"t_ptr": "*i64"},
                            {"smoothing"}))
    return out
