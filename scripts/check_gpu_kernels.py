"""Ahead-of-time compile check of every GPU kernel, on a machine without a GPU.

Each Triton variant of ``vocabsem_fast.kernels.variants.variants()`` is compiled for sm_80 (A100)
and sm_90 (H100 / H200) with ``triton.compile`` (the triton wheel ships ptxas and cuobjdump),
and every CUDA kernel of ``csrc/cuda`` with ``nvcc -Xptxas -v`` for the same two targets. For
each it reports registers per thread, spill stack bytes, shared memory and whether the kernel
uses tensor-core MMAs (``wgmma`` on sm_90, ``mma.sync`` on sm_80). Exits non-zero on any compile
error, and with ``--strict`` also on a bf16 / fp16 Triton variant that spills or, having a dot,
misses the tensor cores.

    python scripts/check_gpu_kernels.py --out bench/results/gpu-kernels.md --json bench/results/gpu-kernels.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)


def _triton_bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes) -> dict:
    """REG / STACK / SHARED of the one kernel in a cubin, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{text}")
    return {"registers": int(found[1]), "stack": int(found[2]), "static_shared": int(found[3])}


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def _stack_without_workaround(ptx: str, arch: int) -> int:
    """Spill bytes of the same PTX through ptxas without the ``--regAllocOptLevel=2`` that
    triton 3.9 adds to work around a ptxas 13 bug (its register allocator then spills a few
    64-bit values that plain allocation keeps in registers)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True).stderr
    found = re.search(r"(\d+) bytes spill stores", log)
    return int(found[1]) if found else -1


def compile_triton(index: int, arch: int) -> dict:
    """Compile variant ``index`` for sm_``arch``; a row of the report (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vocabsem_fast.kernels.variants import variants

    v = variants()[index]
    row = {"kind": "triton", "name": v.name, "arch": f"sm_{arch}", **v.options}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs())
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
        row.update(_resources(compiled.asm["cubin"]))
        row["dynamic_shared"] = int(compiled.metadata.shared)
        row["mma"] = _mma(compiled.asm["ptx"])
        row["has_dot"] = "tt.dot" in compiled.asm["ttir"]
        if row["stack"] > 0:
            row["stack_without_workaround"] = _stack_without_workaround(compiled.asm["ptx"], arch)
    except Exception as exc:  # noqa: BLE001  (a failed compile is the result this check reports)
        row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def compile_cuda(nvcc: str) -> list[dict]:
    """``nvcc -Xptxas -v`` of every .cu file for each target: one row per kernel instantiation."""
    rows = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for arch in ARCHS:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [nvcc, f"-arch=sm_{arch}", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                       "-c", str(cu), "-o", os.path.join(tmp, "out.o")]
                done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"kind": "cuda", "name": cu.name, "arch": f"sm_{arch}", "error": done.stderr[-800:]})
                continue
            rows += _parse_ptxas(done.stderr, cu.name, arch)
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _parse_ptxas(text: str, source: str, arch: int) -> list[dict]:
    rows, current = [], None
    for line in text.splitlines():
        started = re.search(r"Compiling entry function '(\w+)'", line)
        if started:
            current = {"kind": "cuda", "name": started[1], "arch": f"sm_{arch}", "source": source}
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame and current is not None:
            current.update(stack=int(frame[1]), spill_stores=int(frame[2]), spill_loads=int(frame[3]))
        used = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if used and current is not None:
            current.update(registers=int(used[1]), static_shared=int(used[2] or 0))
            rows.append(current)
            current = None
    names = _demangle([r["name"] for r in rows])
    for r in rows:  # "void ns::(anonymous namespace)::kernel<float>(args)" -> "kernel<float>"
        name = names[r["name"]].replace("(anonymous namespace)::", "")
        name = re.sub(r"^void ", "", name.split("(")[0])
        r["name"] = name.split("::")[-1] if "<" not in name else re.sub(r"^[\w:]*::(?=\w+<)", "", name)
    return rows


def _table(rows: list[dict]) -> str:
    """Triton: cuobjdump's stack frame of the cubin Triton built (its kernels hold no local
    arrays, so any stack is spilled registers). CUDA: ptxas's stack frame and spill stores (a
    stack without spill stores is a local array, e.g. the soft assignment's per-lane scores)."""
    lines = ["| kernel | arch | registers | stack B | spill stores B | shared B | tensor-core MMA | warps / stages |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['arch']} | compile error | | | | | |")
            continue
        shared = r.get("static_shared", 0) + r.get("dynamic_shared", 0)
        if r["kind"] == "triton":
            spills = r["stack"]
            if "stack_without_workaround" in r:
                spills = f"{spills} ({r['stack_without_workaround']} without the ptxas workaround flag)"
            mma = r["mma"] if r.get("has_dot") else "no dot"
            warps = f"{r['num_warps']} / {r['num_stages']}"
        else:
            spills, mma, warps = r.get("spill_stores", 0), "n/a (no dot)", ""
        lines.append(f"| {r['name']} | {r['arch']} | {r['registers']} | {r['stack']} | {spills} | {shared} | {mma} "
                     f"| {warps} |")
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    """bf16 / fp16 Triton variants that spill, or that have a dot and miss the tensor cores."""
    out = []
    for r in rows:
        if r["kind"] != "triton" or "error" in r or not re.search(r"\[(bf16|fp16)", r["name"]):
            continue
        if r["stack"] > 0:
            out.append(f"{r['name']} {r['arch']}: {r['stack']} bytes of spill stack")
        if r.get("has_dot") and r["mma"] == "none":
            out.append(f"{r['name']} {r['arch']}: a dot without tensor-core MMA")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown report")
    parser.add_argument("--json", type=Path, help="every row as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--strict", action="store_true", help="fail on bf16 / fp16 spills or missing tensor cores")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    from vocabsem_fast.kernels.variants import variants

    jobs = [(i, arch) for i in range(len(variants())) for arch in ARCHS]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_triton, *zip(*jobs)))
    if not args.no_cuda:
        nvcc = os.environ.get("NVCC", shutil.which("nvcc") or "")
        if not nvcc:
            print("check_gpu_kernels: nvcc not found (use --no-cuda to skip the CUDA kernels)", file=sys.stderr)
            return 1
        rows += compile_cuda(nvcc)
    elapsed = time.perf_counter() - start
    errors = [r for r in rows if "error" in r]
    bad = problems(rows)
    import triton

    header = (f"# GPU kernels compiled ahead of time\n\n{len(jobs)} Triton variants (triton {triton.__version__}, "
              f"its bundled ptxas) and the CUDA kernels (nvcc -Xptxas -v) for sm_80 and sm_90, "
              f"{elapsed:.0f} s on {os.cpu_count()} cores. Command: `python scripts/check_gpu_kernels.py "
              f"--out bench/results/gpu-kernels.md --json bench/results/gpu-kernels.json`.\n\n"
              f"Compile errors: {len(errors)}. bf16 / fp16 Triton variants that spill or miss the tensor cores: "
              f"{len(bad)}.\n\n")
    report = header + _table(rows) + "\n"
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "problems": bad, "seconds": elapsed}, indent=1) + "\n")
    print(f"{len(rows)} compiled kernel variants in {elapsed:.0f} s; {len(errors)} compile errors; "
          f"{len(bad)} bf16/fp16 spill or tensor-core problems")
    for r in errors:
        print(f"COMPILE ERROR {r['name']} {r['arch']}: {r['error']}", file=sys.stderr)
    for line in bad:
        print(f"PROBLEM {line}", file=sys.stderr)
    return 1 if errors or (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
