"""GPU check: correctness of every GPU backend against the reference, then benchmarks.

Run on a CUDA machine after ``bench/gpu_check.sh`` has built the package (it calls this file):

    python bench/library/gpu_check.py --out bench/results/gpu-check.json [--quick]

``--rehearse`` runs every step without a GPU, as ``bench/gpu_check.sh --rehearse`` does (with
``TRITON_INTERPRET=1``): the GPU tests and the Triton kernels under the interpreter, NCCL's step
on gloo, the benchmarks on tiny CPU shapes (their figures mean nothing; the run shows that each
step starts, ends and reports within its budget).

1. Correctness: ``tests/library/gpu_backend_cases.py`` on the GPU for the triton and cuda backends
   (fp32, bf16 and fp16, odd shapes, reductions, label smoothing, gradients, few rows over many
   vocabulary splits, top-k values and indices, hard and soft assignment) and
   ``tests/library/test_host_syncs.py`` (no op synchronises: ``torch.cuda.set_sync_debug_mode``);
   with ``--cpu-suite`` also the CPU test suite (without the real-model tests). The project's
   pytest ``addopts`` are overridden (they need pytest-benchmark, which a bare machine may lack).
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

``torch.compile`` of the reference is compiled once (dynamic shapes) and warmed on a small shape
in both modes before any timing. Which GEMM path the GPU strips took (``out_dtype=`` or an
upcast) is recorded. Results go to one JSON file and a table printed last. Contenders whose package is missing are
listed with the reason, never silently dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import timedelta
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


class Machine:
    """Where the steps run: the GPU, or (rehearsal) the CPU with tiny shapes and wall-clock timing."""

    def __init__(self, rehearse: bool):
        self.rehearse = rehearse
        self.device = "cpu" if rehearse else "cuda"
        # (N, d, V) of the cross-entropy benchmarks; the decoding head; the assignment sizes
        self.shapes = [(64, 32, 1000), (16, 24, 777)] if rehearse else [
            (8192, 4096, 128256), (2048, 576, 49152), (8192, 2304, 256000), (16384, 4096, 128256)]
        self.head = (1001, 32) if rehearse else (128256, 4096)
        self.topk_rows = 64 if rehearse else 8192
        self.assignment = (5000, 64, 24) if rehearse else (1_000_000, 1024, 576)

    def sync(self) -> None:
        if not self.rehearse:
            torch.cuda.synchronize()

    def empty_cache(self) -> None:
        if not self.rehearse:
            torch.cuda.empty_cache()


MACHINE = Machine(rehearse=False)


def correctness(cpu_suite: bool) -> dict:
    runs = {}
    # the project's addopts need pytest-benchmark, which a bare GPU machine may not have
    pytest = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=-ra", "-p", "no:cacheprovider"]
    commands = {"gpu_backend_cases": pytest + ["tests/library/gpu_backend_cases.py"],
                "host_syncs": pytest + ["tests/library/test_host_syncs.py"]}
    if cpu_suite:  # the CPU suite must stay green on a GPU machine too (a few minutes more)
        commands["cpu_suite"] = pytest + ["-x", "tests", "-m", "not real_model"]
    env = {**os.environ, "TRITON_INTERPRET": "1"} if MACHINE.rehearse else None
    for name, cmd in commands.items():
        start = time.time()
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET.timeout(240),
                                    env=env)
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
    """The vocabulary-parallel loss on NCCL (one rank: this machine has one GPU; gloo on the CPU in
    a rehearsal) against the single-process op, bf16 and fp32. A group that cannot form fails
    within its timeout instead of hanging the run."""
    import torch.distributed as dist

    import vocabsem_fast as vs
    from vocabsem_fast import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = MACHINE.device
    out = {"backend": "gloo" if MACHINE.rehearse else "nccl"}
    try:
        dist.init_process_group(out["backend"], rank=0, world_size=1, timeout=timedelta(seconds=60))
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.randn(333, 257, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(5003, 257, device=device, dtype=dtype, requires_grad=True)
            t = torch.randint(0, 5003, (333,), device=device)
            loss = distributed.similarity_cross_entropy(h, b, t, vocab_start=0, scale=20.0)
            gh, gb = torch.autograd.grad(loss, (h, b))
            ref = vs.similarity_cross_entropy(h, b, t, scale=20.0)
            rh, rb = torch.autograd.grad(ref, (h, b))
            out[str(dtype)] = {"loss_diff": abs(float(loss) - float(ref)),
                               "grad_hidden_max_diff": float((gh.float() - rh.float()).abs().max()),
                               "grad_bases_max_diff": float((gb.float() - rb.float()).abs().max())}
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"[correctness] {out['backend']}: {out}", flush=True)
    return out


def timed(fn, *, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events; the wall clock in a rehearsal)."""
    for _ in range(warmup):
        fn()
    MACHINE.sync()
    times = []
    for _ in range(reps):
        if MACHINE.rehearse:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float:
    if MACHINE.rehearse:
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@functools.cache
def compiled_reference():
    """``torch.compile`` of the reference loss, made once with dynamic shapes: later shapes reuse it."""
    from vocabsem_fast import reference

    return torch.compile(reference.similarity_cross_entropy, dynamic=True)


def warm_compile() -> dict:
    """Compile the reference's two graphs (forward alone, forward and backward) on a small shape,
    so that no benchmark times a compilation."""
    start = time.time()
    fn = compiled_reference()
    try:
        for n, v in ((37, 301), (53, 419)):  # a second shape: the dynamic graph is reused, not rebuilt
            h = torch.randn(n, 64, device=MACHINE.device, requires_grad=True)
            b = torch.randn(v, 64, device=MACHINE.device, requires_grad=True)
            t = torch.randint(0, v, (n,), device=MACHINE.device)
            with torch.no_grad():
                fn(h, b, t, scale=1.0, normalize=False)
            fn(h, b, t, scale=1.0, normalize=False).backward()
        MACHINE.sync()
        out = {"seconds": round(time.time() - start, 1)}
    except Exception as exc:  # noqa: BLE001  (the benchmarks then record the compiled contender's error)
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(f"[compile] torch.compile of the reference: {out}", flush=True)
    return out


def contenders(normalize_ours: bool):
    """name -> loss function (hidden, bases, targets) or the reason it is unavailable."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    out = {}
    out["reference"] = lambda h, b, t: reference.similarity_cross_entropy(h, b, t, scale=1.0, normalize=False)
    compiled = compiled_reference()
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
    device = MACHINE.device
    gen = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(n, d, device=device, generator=gen) * 0.05).bfloat16().requires_grad_(True)
    b = (torch.randn(v, d, device=device, generator=gen) * 0.05).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device=device, generator=gen)
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
            MACHINE.empty_cache()
        rows.append(row)
        print(f"[bench] {row}", flush=True)
    h = b = t = None  # free the inputs before the next shape
    MACHINE.empty_cache()


def gemm_rate(n: int, d: int, v: int) -> float:
    """Measured bf16 TFLOP/s of the three GEMMs of a fused loss (N x d @ d x V and its two grads)."""
    h = torch.randn(n, d, device=MACHINE.device, dtype=torch.bfloat16)
    b = torch.randn(v, d, device=MACHINE.device, dtype=torch.bfloat16)
    g = torch.randn(n, v, device=MACHINE.device, dtype=torch.bfloat16)

    def three():
        h @ b.T
        g @ b
        g.T @ h

    ms = timed(three)
    g = None  # free the (N, V) gradient stand-in
    MACHINE.empty_cache()
    return 3 * 2.0 * n * d * v / ms / 1e9


def _record(rows: list, op: str, name: str, measure) -> None:
    """One timed case: ``measure()``'s fields, or the error that stopped it (an out-of-memory
    contender is a result too)."""
    try:
        rows.append({"op": op, "contender": name, **measure()})
    except Exception as exc:  # noqa: BLE001
        rows.append({"op": op, "contender": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
    print(f"[bench] {rows[-1]}", flush=True)


def bench_decoding(rows: list) -> None:
    """Decoding and scoring shapes: the loss forward without gradients and the top-1 (greedy
    decoding) of N = 1, 8, 64 rows against the Llama-3 head, every fused backend and the reference."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    v, d = MACHINE.head
    b = torch.randn(v, d, device=MACHINE.device, dtype=torch.bfloat16)
    for n in (1, 8, 64):
        h = torch.randn(n, d, device=MACHINE.device, dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device=MACHINE.device)
        cases = {"reference loss": lambda h=h, t=t: reference.similarity_cross_entropy(h, b, t, scale=20.0),
                 "reference top-1": lambda h=h: reference.similarity_topk(h, b, k=1, scale=20.0)}
        for impl in ("triton", "cuda"):
            if vs.backends.unavailable_reason(impl) is None:
                cases[f"{impl} loss"] = lambda impl=impl, h=h, t=t: vs.similarity_cross_entropy(
                    h, b, t, scale=20.0, impl=impl)
                cases[f"{impl} top-1"] = lambda impl=impl, h=h: vs.similarity_topk(h, b, k=1, scale=20.0, impl=impl)
        for name, fn in cases.items():
            with torch.no_grad():
                _record(rows, f"decode N={n} d={d} V={v} bf16", name, lambda fn=fn: {"ms": timed(fn, reps=20)})


def bench_topk(rows: list) -> None:
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    v, d = MACHINE.head
    n = MACHINE.topk_rows
    h = torch.randn(n, d, device=MACHINE.device, dtype=torch.bfloat16)
    b = torch.randn(v, d, device=MACHINE.device, dtype=torch.bfloat16)
    cases = {"reference": lambda: reference.similarity_topk(h, b, k=5)}
    for impl in ("triton", "cuda"):
        if vs.backends.unavailable_reason(impl) is None:
            cases[impl] = lambda impl=impl: vs.similarity_topk(h, b, k=5, impl=impl)
    for name, fn in cases.items():
        _record(rows, f"topk k=5 N={n} d={d} V={v}", name, lambda fn=fn: {"ms": timed(fn), "peak_mib": peak_mib(fn)})


def bench_assignment(rows: list) -> None:
    """Hard assignment of 1M points to 1024 centroids (d = 576) and 10 k-means iterations on a
    fifth of them (256 clusters): the fused backends against the materialising reference and,
    when it can be imported, faiss."""
    import vocabsem_fast as vs
    from vocabsem_fast import reference

    n, k, d = MACHINE.assignment
    gen = torch.Generator(device=MACHINE.device).manual_seed(0)
    points = torch.randn(n, d, device=MACHINE.device, generator=gen)
    centroids = torch.randn(k, d, device=MACHINE.device, generator=gen)
    sample, clusters = n // 5, k // 4
    cases = {"reference": lambda: reference.assign(points, centroids, hard=True)}
    for impl in ("cuda", "triton"):
        if vs.backends.unavailable_reason(impl) is None:
            cases[impl] = lambda impl=impl: vs.assign(points, centroids, hard=True, impl=impl)
            cases[f"kmeans10_{impl}"] = lambda impl=impl: vs.kmeans(points[:sample], clusters, iters=10, impl=impl)
    cases["kmeans10_reference"] = lambda: reference.kmeans(points[:sample], clusters, iters=10)
    try:
        import faiss  # noqa: PLC0415

        if hasattr(faiss, "StandardGpuResources") and not MACHINE.rehearse:
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, d)
            index.add(centroids.cpu().numpy())
            host = points.cpu().numpy()
            cases["faiss_gpu_flat_ip"] = lambda: index.search(host, 1)
        else:
            rows.append({"op": "assignment", "contender": "faiss", "error": "faiss has no GPU support here"})
    except ImportError as exc:
        rows.append({"op": "assignment", "contender": "faiss", "error": f"faiss unavailable ({exc})"})
    for name, fn in cases.items():
        op = (f"kmeans 10 iters N={sample} K={clusters} d={d}" if name.startswith("kmeans")
              else f"hard assign N={n} K={k} d={d}")
        _record(rows, op, name, lambda fn=fn: {"ms": timed(fn, warmup=1, reps=3), "peak_mib": peak_mib(fn)})


def main() -> int:
    global MACHINE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu-check.json"))
    parser.add_argument("--quick", action="store_true", help="one benchmark shape only")
    parser.add_argument("--cpu-suite", action="store_true", help="also run the CPU test suite on this machine")
    parser.add_argument("--rehearse", action="store_true",
                        help="no GPU: every step on stand-ins (interpreter, gloo, tiny CPU shapes)")
    args = parser.parse_args()
    MACHINE = Machine(args.rehearse)
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (--rehearse runs the steps without one)", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    import vocabsem_fast as vs
    from vocabsem_fast.backends import strips

    result = {"machine": {"gpu": torch.cuda.get_device_name() if not args.rehearse else "none (rehearsal)",
                          "python": platform.python_version(), "torch": torch.__version__,
                          "triton": triton_version, "cuda": torch.version.cuda,
                          "vocabsem_fast": vs.__version__, "backends": vs.available_backends(),
                          "build": os.environ.get("VOCABSEM_GPU_CHECK_BUILD", "not through gpu_check.sh")},
              "command": " ".join(sys.argv), "steps": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every step: a run stopped by its time limit keeps what it measured
        result["gemm_paths"] = dict(strips.GEMM_PATHS)
        out.write_text(json.dumps(result, indent=2) + "\n")

    @contextlib.contextmanager
    def step(name):
        start = time.time()
        yield
        result["steps"][name] = round(time.time() - start, 1)
        save()

    with step("correctness"):
        result["correctness"] = correctness(args.cpu_suite)
    with step("nccl"):
        result["nccl"] = nccl_check()
    with step("compile"):
        result["compile"] = warm_compile()
    shapes = MACHINE.shapes[:1] if args.quick else MACHINE.shapes
    rows: list = []
    result["gemm_tflops"], result["cross_entropy"], result["skipped"] = {}, rows, []
    for n, d, v in shapes:
        if not BUDGET.allows(90 if not args.rehearse else 5):
            result["skipped"].append(f"cross-entropy N={n} d={d} V={v}: time budget")
            continue
        with step(f"cross-entropy N={n} d={d} V={v}"):
            rate = gemm_rate(n, d, v)
            result["gemm_tflops"][f"N={n} d={d} V={v}"] = rate
            print(f"[bench] GEMM N={n} d={d} V={v}: {rate:.0f} TFLOP/s", flush=True)
            bench_cross_entropy(n, d, v, rate, rows, normalize_ours=(n, d, v) == shapes[0])
    topk_rows: list = []
    result["topk_and_assignment"] = topk_rows
    for name, bench, seconds in (("decoding", bench_decoding, 30), ("top-k", bench_topk, 30),
                                 ("assignment", bench_assignment, 60)):
        if BUDGET.allows(seconds if not args.rehearse else 5):
            with step(name):
                bench(topk_rows)
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
    print(f"GEMM paths of the GPU strips: {result['gemm_paths'] or 'none ran'}")
    print("step seconds: " + ", ".join(f"{name} {sec}" for name, sec in result["steps"].items()))
    for line in result["skipped"]:
        print(f"skipped {line}")
    print(f"\ncorrectness: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
