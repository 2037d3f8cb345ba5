"""GPU check: correctness of every GPU backend against the reference, then benchmarks.

Run on a CUDA machine after ``bench/gpu_check.sh`` has built the package (it calls this file):

    python bench/library/gpu_check.py --out bench/results/gpu-check.json [--quick]

1. Correctness: ``tests/library/gpu_backend_cases.py`` on the GPU for the triton and cuda backends
   (fp32, bf16 and fp16, odd shapes, reductions, label smoothing, gradients, few rows over many
   vocabulary splits, top-k, hard and soft assignment); with ``--cpu-suite`` also the CPU test suite (without the
   real-model tests).
2. Benchmarks of the similarity cross-entropy, forward, backward and both, bf16, at
   N = 8192 and 16384, d = 4096, V = 128256 (Llama-3), N = 2048, d = 576, V = 49152 (SmolLM2) and
   N = 8192, d = 2304, V = 256000 (Gemma-2),
   against: the materialising reference, ``torch.compile`` of it, Liger-Kernel's and Cut
   Cross-Entropy's fused linear cross-entropy (raw logits, so our kernels also run with
   ``normalize=False``), and a plain bf16 GEMM of the same size (the throughput ceiling). For each:
   median time (CUDA events), TFLOP/s counting 2 N d V per GEMM (1 forward, 2 backward), the
   fraction of the measured GEMM rate, and the peak memory above the inputs.
3. Decoding shapes (N = 1, 8, 64 against the Llama-3 head: loss forward and top-1), top-k
   (k = 5), hard assignment and k-means timings of the fused backends against the
   materialising reference (and faiss's GPU flat index where faiss can be imported).

The whole run keeps to 8 minutes (``VOCABSEM_GPU_CHECK_SECONDS``): each step has a time limit,
a step that would start too late is skipped and named in the results, and the JSON is written
after every step.

Results go to one JSON file and a table printed last. Contenders whose package is missing are
listed with the reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "library"))


class Budget:
    """The run's time limit, and each step's: a step that would start too late is skipped (and
    says so in the results); ``timeout`` bounds a subprocess."""

    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, step_seconds: float) -> bool:
        return self.left() > step_seconds

    def timeout(self, cap: float) -> float:
        return max(1.0, min(cap, self.left() - 5))


BUDGET = Budget(float(os.environ.get("VOCABSEM_GPU_CHECK_SECONDS", "480")))  # 8 minutes in all


def correctness(cpu_suite: bool) -> dict:
    runs = {}
    commands = {"gpu_backend_cases": [sys.executable, "-m", "pytest", "-q", "tests/library/gpu_backend_cases.py"]}
    if cpu_suite:  # the CPU suite must stay green on a GPU machine too (a few minutes more)
        commands["cpu_suite"] = [sys.executable, "-m", "pytest", "-q", "-x", "tests", "-m", "not real_model"]
    for name, cmd in commands.items():
        start = time.time()
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET.timeout(240))
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            runs[name] = {"returncode": 124, "summary": f"timed out after {exc.timeout:.0f} s",
                          "log_tail": out[-4000:], "seconds": round(time.time() - start, 1)}
            print(f"[correctness] {name}: timed out", flush=True)
            continue
        tail = (result.stdout + result.stderr).strip().splitlines()
        runs[name] = {"returncode": result.returncode, "summary": tail[-1] if tail else "",
                      "seconds": round(time.time() - start, 1)}
        if result.returncode != 0:
            runs[name]["log_tail"] = "\n".join(tail[-60:])
        print(f"[correctness] {name}: {runs[name]['summary']}", flush=True)
    return runs


def nccl_check() -> dict:
    """The vocabulary-parallel loss on NCCL (one rank: this machine has one GPU) against the
    single-process op on CUDA tensors, bf16 and fp32."""
    import os

    import torch.distributed as dist

    import vocabsem_fast as vs
    from vocabsem_fast import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    out = {}
    try:
        dist.init_process_group("nccl", rank=0, world_size=1)
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.randn(333, 257, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(5003, 257, device="cuda", dtype=dtype, requires_grad=True)
            t = torch.randint(0, 5003, (333,), device="cuda")
            loss = distributed.similarity_cross_entropy(h, b, t, vocab_start=0, scale=20.0)
            gh, gb = torch.autograd.grad(loss, (h, b))
            ref = vs.similarity_cross_entropy(h, b, t, scale=20.0)
            rh, rb = torch.autograd.grad(ref, (h, b))
            out[str(dtype)] = {"loss_diff": abs(float(loss) - float(ref)),
                               "grad_hidden_max_diff": float((gh.float() - rh.float()).abs().max()),
                               "grad_bases_max_diff": float((gb.float() - rb.float()).abs().max())}
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"[correctness] nccl: {out}", flush=True)
    return out


def timed(fn, *, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def contenders(normalize_ours: bool):
    """name -> loss function (hidden, bases, targets) or the reason it is unavailable."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    out = {}
    out["reference"] = lambda h, b, t: reference.similarity_cross_entropy(h, b, t, scale=1.0, normalize=False)
    compiled = torch.compile(reference.similarity_cross_entropy)
    out["compiled_reference"] = lambda h, b, t: compiled(h, b, t, scale=1.0, normalize=False)
    for impl in ("triton", "cuda"):
        reason = vs.backends.unavailable_reason(impl)
        out[impl] = reason or (lambda h, b, t, impl=impl: vs.similarity_cross_entropy(
            h, b, t, scale=1.0, normalize=False, impl=impl))
        if normalize_ours:
            out[f"{impl}_normalized"] = reason or (lambda h, b, t, impl=impl: vs.similarity_cross_entropy(
                h, b, t, scale=20.0, impl=impl))
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger_flce"] = lambda h, b, t: liger(b, h, t)
    except Exception as exc:  # noqa: BLE001
        out["liger_flce"] = f"liger-kernel unavailable ({type(exc).__name__}: {exc})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, b, t: linear_cross_entropy(h, b, t)
    except Exception as exc:  # noqa: BLE001
        out["cce"] = f"cut-cross-entropy unavailable ({type(exc).__name__}: {exc})"
    return out


def bench_cross_entropy(n: int, d: int, v: int, gemm_tflops: float, rows: list, normalize_ours: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, d, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_(True)
    b = (torch.randn(v, d, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    gemm_flop = 2.0 * n * d * v
    for name, fn in contenders(normalize_ours).items():
        row = {"shape": f"N={n} d={d} V={v}", "contender": name}
        if isinstance(fn, str):
            rows.append({**row, "error": fn})
            continue
        try:
            def forward(fn=fn):
                with torch.no_grad():
                    fn(h, b, t)

            def both(fn=fn):
                h.grad = b.grad = None
                fn(h, b, t).backward()

            fwd_ms = timed(forward)
            both_ms = timed(both)
            peak = peak_mib(both)
            row.update(forward_ms=fwd_ms, forward_backward_ms=both_ms, backward_ms=both_ms - fwd_ms,
                       tflops=3 * gemm_flop / both_ms / 1e9, peak_mib=peak)
            row["fraction_of_gemm"] = row["tflops"] / gemm_tflops
        except Exception as exc:  # noqa: BLE001  (an out-of-memory reference is a result too)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"[bench] {row}", flush=True)
    h = b = t = None  # free the inputs before the next shape
    torch.cuda.empty_cache()


def gemm_rate(n: int, d: int, v: int) -> float:
    """Measured bf16 TFLOP/s of the three GEMMs of a fused loss (N x d @ d x V and its two grads)."""
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)

    def three():
        h @ b.T
        g @ b
        g.T @ h

    ms = timed(three)
    g = None  # free the (N, V) gradient stand-in
    torch.cuda.empty_cache()
    return 3 * 2.0 * n * d * v / ms / 1e9


def bench_decoding(rows: list) -> None:
    """Decoding and scoring shapes: the loss forward without gradients and the top-1 (greedy
    decoding) of N = 1, 8, 64 rows against the Llama-3 head, every fused backend and the reference."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    b = torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16)
    for n in (1, 8, 64):
        h = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, 128256, (n,), device="cuda")
        cases = {"reference loss": lambda h=h, t=t: reference.similarity_cross_entropy(h, b, t, scale=20.0),
                 "reference top-1": lambda h=h: reference.similarity_topk(h, b, k=1, scale=20.0)}
        for impl in ("triton", "cuda"):
            if vs.backends.unavailable_reason(impl) is None:
                cases[f"{impl} loss"] = lambda impl=impl, h=h, t=t: vs.similarity_cross_entropy(
                    h, b, t, scale=20.0, impl=impl)
                cases[f"{impl} top-1"] = lambda impl=impl, h=h: vs.similarity_topk(h, b, k=1, scale=20.0, impl=impl)
        for name, fn in cases.items():
            op = f"decode N={n} d=4096 V=128256 bf16"
            with torch.no_grad():
                try:
                    rows.append({"op": op, "contender": name, "ms": timed(fn, reps=20)})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"op": op, "contender": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"[bench] {rows[-1]}", flush=True)


def bench_topk(rows: list) -> None:
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    h = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16)
    for name, fn in {"reference": lambda: reference.similarity_topk(h, b, k=5),
                     "triton": lambda: vs.similarity_topk(h, b, k=5, impl="triton")}.items():
        try:
            rows.append({"op": "topk k=5 N=8192 d=4096 V=128256", "contender": name, "ms": timed(fn),
                         "peak_mib": peak_mib(fn)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": "topk", "contender": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(f"[bench] {rows[-1]}", flush=True)


def bench_assignment(rows: list) -> None:
    """Hard assignment of 1M points to 1024 centroids (d = 576) and 10 k-means iterations: the
    fused backends against the materialising reference and, when it can be imported, faiss."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    points = torch.randn(1_000_000, 576, device="cuda", generator=gen)
    centroids = torch.randn(1024, 576, device="cuda", generator=gen)
    cases = {"reference": lambda: reference.assign(points, centroids, hard=True)}
    for impl in ("cuda", "triton"):
        if vs.backends.unavailable_reason(impl) is None:
            cases[impl] = lambda impl=impl: vs.assign(points, centroids, hard=True, impl=impl)
            cases[f"kmeans10_{impl}"] = lambda impl=impl: vs.kmeans(points[:200_000], 256, iters=10, impl=impl)
    cases["kmeans10_reference"] = lambda: reference.kmeans(points[:200_000], 256, iters=10)
    try:
        import faiss  # noqa: PLC0415

        if hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, 576)
            index.add(centroids.cpu().numpy())
            host = points.cpu().numpy()
            cases["faiss_gpu_flat_ip"] = lambda: index.search(host, 1)
        else:
            rows.append({"op": "assignment", "contender": "faiss", "error": "faiss has no GPU support here"})
    except ImportError as exc:
        rows.append({"op": "assignment", "contender": "faiss", "error": f"faiss unavailable ({exc})"})
    for name, fn in cases.items():
        op = "kmeans 10 iters N=200000 K=256 d=576" if name.startswith("kmeans") else "hard assign N=1e6 K=1024 d=576"
        try:
            rows.append({"op": op, "contender": name, "ms": timed(fn, warmup=1, reps=3), "peak_mib": peak_mib(fn)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": op, "contender": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(f"[bench] {rows[-1]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu-check.json"))
    parser.add_argument("--quick", action="store_true", help="one benchmark shape only")
    parser.add_argument("--cpu-suite", action="store_true", help="also run the CPU test suite on this machine")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here", file=sys.stderr)
        return 2
    import triton

    import vocabsem_fast as vs

    result = {"machine": {"gpu": torch.cuda.get_device_name(), "python": platform.python_version(),
                          "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                          "vocabsem_fast": vs.__version__, "backends": vs.available_backends()},
              "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every step: a run stopped by its time limit keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    result["correctness"] = correctness(args.cpu_suite)
    save()
    result["nccl"] = nccl_check()
    save()
    shapes = [(8192, 4096, 128256)] if args.quick else [(8192, 4096, 128256), (2048, 576, 49152),
                                                        (8192, 2304, 256000), (16384, 4096, 128256)]
    rows: list = []
    result["gemm_tflops"], result["cross_entropy"], result["skipped"] = {}, rows, []
    for n, d, v in shapes:
        if not BUDGET.allows(90):
            result["skipped"].append(f"cross-entropy N={n} d={d} V={v}: time budget")
            continue
        rate = gemm_rate(n, d, v)
        result["gemm_tflops"][f"N={n} d={d} V={v}"] = rate
        print(f"[bench] GEMM N={n} d={d} V={v}: {rate:.0f} TFLOP/s", flush=True)
        bench_cross_entropy(n, d, v, rate, rows, normalize_ours=(n, d, v) == shapes[0])
        save()
    topk_rows: list = []
    result["topk_and_assignment"] = topk_rows
    for name, step, seconds in (("decoding", bench_decoding, 30), ("top-k", bench_topk, 30),
                                ("assignment", bench_assignment, 60)):
        if BUDGET.allows(seconds):
            step(topk_rows)
        else:
            result["skipped"].append(f"{name}: time budget")
        save()
    print(f"\n{'shape':<24} {'contender':<22} {'fwd ms':>8} {'bwd ms':>8} {'both ms':>8} {'TFLOP/s':>8} "
          f"{'of GEMM':>7} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<24} {r['contender']:<22} {r['error'][:70]}")
        else:
            print(f"{r['shape']:<24} {r['contender']:<22} {r['forward_ms']:>8.1f} {r['backward_ms']:>8.1f} "
                  f"{r['forward_backward_ms']:>8.1f} {r['tflops']:>8.0f} {r['fraction_of_gemm']:>7.2f} "
                  f"{r['peak_mib']:>9.0f}")
    for r in topk_rows:
        print(f"{r['op']:<40} {r['contender']:<22} " + (f"{r['ms']:>9.2f} ms" if "ms" in r else r["error"][:60]))
    failed = [name for name, run in result["correctness"].items() if run["returncode"] != 0]
    for line in result["skipped"]:
        print(f"skipped {line}")
    print(f"\ncorrectness: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
