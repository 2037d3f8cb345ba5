"""Print (and write as Markdown) one table of ratios from a pytest-benchmark JSON file.

    python bench/library/summarize.py bench/results/foundation-cpu.json [--out bench/results/foundation-cpu.md]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def table(data: dict) -> str:
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        contender = bench["params"]["contender"]
        groups[bench["group"]][contender] = bench
    lines = []
    for group, by_contender in groups.items():
        ref = by_contender.get("reference")
        lines += [f"### {group}", "",
                  "| contender | median s | x reference time | GFLOP/s | extra peak MiB | workspace MiB "
                  "| reference workspace / this |",
                  "|---|---|---|---|---|---|---|"]
        for name, bench in by_contender.items():
            median = bench["stats"]["median"]
            extra = bench["extra_info"]
            peak = extra.get("extra_peak_bytes", float("nan"))
            ratio_t = median / ref["stats"]["median"] if ref else float("nan")
            work = extra.get("workspace_bytes", float("nan"))
            ratio_m = ref["extra_info"].get("workspace_bytes", float("nan")) / max(work, 1) if ref else float("nan")
            gflops = extra.get("gemm_flops", 0) / median / 1e9
            lines.append(f"| {name} | {median:.3f} | {ratio_t:.2f} | {gflops:.1f} | {peak / 2**20:.1f} "
                         f"| {work / 2**20:.1f} | {ratio_m:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--out")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    import torch

    machine = data["machine_info"]
    threads = {b["extra_info"].get("threads") for b in data["benchmarks"]} - {None}
    rounds = "/".join(str(r) for r in sorted({b["extra_info"].get("rounds", 3) for b in data["benchmarks"]}))
    header = (f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
              f"{machine.get('cpu', {}).get('count', '?')} logical CPUs (torch threads {sorted(threads)}); "
              f"Python {machine.get('python_version')}; torch {torch.__version__}; "
              f"commit {data.get('commit_info', {}).get('id', '?')[:10]}; {data.get('datetime')}\n\n"
              f"Times are medians of {rounds} rounds after 1 warm-up (pytest-benchmark). Extra peak: resident\n"
              "memory above the inputs in a fresh process (bench/library/peak_memory.py); workspace: that less the\n"
              "returned gradients. GFLOP/s counts the GEMM work (1 product forward, 3 for forward+backward).\n")
    isa = machine.get("cpu_isa")
    if isa:
        header += (f"CPU flags {', '.join(isa['cpu_flags'])}; torch CPU capability {isa['torch_cpu_capability']}; "
                   f"oneDNN ISA: {isa['onednn_isa']}; bf16 GEMM: {'; '.join(isa['onednn_matmuls'])}; "
                   f"fp16 GEMM on oneDNN: {isa['fp16_on_onednn']}.\n")
    text = header + "\n" + table(data)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
