"""A/B timing of two checkouts of vocabsem_fast, interleaved in one run on the same inputs.

Each measurement is a fresh process that imports vocabsem_fast from the given checkout (its
extension built in place: ``python setup.py build_ext --inplace``), warms up once, then times
``--rounds`` forward+backward (or forward, or top-k) calls; the two checkouts alternate, so a
drift of the shared machine hits both. Prints one JSON object per measurement and a summary.

    python bench/library/ab_revisions.py --a /path/to/old --b . --impl cpu --shape smollm2 \
        --repeats 3 --out bench/results/ab-restructure.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import vocabsem_fast as vs
assert vs.__file__.startswith(sys.argv[1]), vs.__file__
sys.path.insert(0, sys.argv[2])
import workloads
shape, impl, mode, rounds = workloads.SHAPES[sys.argv[3]], sys.argv[4], sys.argv[5], int(sys.argv[6])
hidden, bases, targets = workloads.make_inputs(shape)
def step():
    if mode == "topk":
        return vs.similarity_topk(hidden, bases, 5, scale=workloads.SCALE, impl=impl)
    h = hidden.clone().requires_grad_(mode == "fwd+bwd")
    b = bases.clone().requires_grad_(mode == "fwd+bwd")
    loss = vs.similarity_cross_entropy(h, b, targets, scale=workloads.SCALE, impl=impl)
    if mode == "fwd+bwd":
        loss.backward()
    return loss
step()
times = []
for _ in range(rounds):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(checkout: Path, shape: str, impl: str, mode: str, rounds: int) -> dict:
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkout), str(here), shape, impl, mode, str(rounds)],
                         capture_output=True, text=True, env=env, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, type=Path, help="checkout A (the baseline)")
    parser.add_argument("--b", required=True, type=Path, help="checkout B")
    parser.add_argument("--impl", default="cpu")
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--modes", default="fwd+bwd,fwd,topk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    results = []
    for mode in args.modes.split(","):
        for repeat in range(args.repeats):
            for label, checkout in (("A", args.a), ("B", args.b)):
                row = {"mode": mode, "checkout": label, "repeat": repeat,
                       **measure(checkout.resolve(), args.shape, args.impl, mode, args.rounds)}
                print(json.dumps(row), flush=True)
                results.append(row)
    summary = {}
    for mode in args.modes.split(","):
        med = {label: statistics.median(t for r in results if r["mode"] == mode and r["checkout"] == label
                                        for t in r["times"]) for label in ("A", "B")}
        rss = {label: max(r["max_rss_mib"] for r in results if r["mode"] == mode and r["checkout"] == label)
               for label in ("A", "B")}
        summary[mode] = {"median_s": med, "b_over_a": med["B"] / med["A"], "max_rss_mib": rss}
        print(f"{mode:8s} A {med['A']:.3f} s  B {med['B']:.3f} s  B/A {med['B'] / med['A']:.3f}   "
              f"max RSS A {rss['A']:.0f} MiB  B {rss['B']:.0f} MiB")
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "a": str(args.a), "b": str(args.b),
                                        "impl": args.impl, "shape": args.shape, "machine": machine,
                                        "summary": summary, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
