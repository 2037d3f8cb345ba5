"""Markdown table of bench_predict_throughput.py's pytest-benchmark JSON: texts per second and
peak memory of TextClassifier.predict against the naive Hugging Face path, per workload.

    python bench/app/summarize_throughput.py bench/results/predict-throughput.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    report = json.load(open(path))
    machine, commit = report["machine_info"], report.get("commit_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    print(f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} logical CPUs; Python "
          f"{machine.get('python_version')}; commit {commit.get('id', '?')[:10]}; {report.get('datetime')}\n")
    print("One timed run per row (pytest-benchmark, rounds=1, after a warm-up batch). Peak MiB: resident memory")
    print("the run added to the process (VmHWM reset at its start). Naive: the Hugging Face model in float32,")
    print("batches of 16 in input order padded to the longest, output_hidden_states=True, full logits.\n")
    groups = defaultdict(list)
    for bench in report["benchmarks"]:
        groups[bench["group"]].append(bench)
    for group, benches in groups.items():
        naive = next((b for b in benches if "naive" in b["name"]), None)
        base = naive["extra_info"]["texts_per_second"] if naive else None
        print(f"### {group}\n")
        print("| contender | texts | mean tokens | dtype | seconds | texts/s | x naive | peak MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for b in benches:
            info = b["extra_info"]
            share = {"all": "", "quarter": " (a quarter)", "quarter x4": " (the quarter x4)"}[info["share"]]
            label = "naive (HF float32)" if "naive" in b["name"] else f"classifier{share}"
            dtype = "float32" if "naive" in b["name"] else info["extraction_dtype"]
            ratio = f"{info['texts_per_second'] / base:.2f}" if base else "n/a"
            peak = "n/a" if info.get("peak_mib") is None else f"{info['peak_mib']:.0f}"
            print(f"| {label} | {info['texts']} | {info['mean_tokens']:.0f} | {dtype} | {b['stats']['median']:.1f} "
                  f"| {info['texts_per_second']:.1f} | {ratio} | {peak} |")
        if naive:
            info = naive["extra_info"]
            print(f"\nNaive and classifier agree on {100 * info['agreement_with_classifier']:.1f}% of the answers "
                  f"(largest probability difference {info['max_probability_difference']:.3f}: bfloat16 against "
                  "float32 forward passes).\n")


if __name__ == "__main__":
    main(sys.argv[1])
