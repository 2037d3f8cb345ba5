"""Markdown tables of an evaluation run (``vocabsem eval --out``): accuracy / macro-F1 per data
set and method, the mean over data sets, fit and predict seconds, the representation analysis,
and the paper's GPT2-Small figures beside ours where it reports the same set.

    python bench/app/summarize_eval.py bench/results/eval/all-methods.json > bench/results/eval/all-methods.md
"""

from __future__ import annotations

import json
import sys

# arXiv 2401.16184 v6, Table 3, GPT2-Small column (ICL / kNN prompting / VDS); TREC is macro-F1
PAPER_GPT2_SMALL = {
    "agnews": {"icl": 0.302, "knn": 0.867, "vds": 0.918},
    "mr": {"icl": 0.501, "knn": 0.730, "vds": 0.810},
    "subj": {"icl": 0.500, "knn": 0.807, "vds": 0.914},
    "trec": {"icl": 0.472, "knn": 0.818, "vds": 0.896},
}
PAPER_METRIC = {"trec": "macro_f1"}


def main(path: str) -> None:
    results = json.load(open(path))
    sets = list(results)
    methods = list(dict.fromkeys(m for per in results.values() for m in per))
    out = []
    out.append("| method | " + " | ".join(sets) + " | mean |")
    out.append("|---" * (len(sets) + 2) + "|")
    for m in methods:
        cells, values = [], []
        for s in sets:
            r = results[s].get(m)
            if r is None:
                cells.append("")
                continue
            cells.append(f"{r['accuracy']:.3f} / {r['macro_f1']:.3f}")
            values.append(r["accuracy"])
        mean = f"{sum(values) / len(values):.3f}" if len(values) == len(sets) else ""
        out.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    print("Accuracy / macro-F1 per data set; mean of accuracy over the sets.\n")
    print("\n".join(out))
    print("\nSeconds (fit + predict; shared representations charged to every method that uses them):\n")
    print("| method | " + " | ".join(sets) + " |")
    print("|---" * (len(sets) + 1) + "|")
    for m in methods:
        cells = [f"{results[s][m]['fit_seconds']:.0f} + {results[s][m]['predict_seconds']:.0f}" if m in results[s]
                 else "" for s in sets]
        print(f"| {m} | " + " | ".join(cells) + " |")
    analysis = [(s, m, r["analysis"]) for s in sets for m, r in results[s].items() if "analysis" in r]
    if analysis:
        print("\nRepresentations of the test split before -> after the semantic clustering module:\n")
        print("| data | method | ARI (k-means) | kNN accuracy |")
        print("|---|---|---|---|")
        for s, m, a in analysis:
            print(f"| {s} | {m} | {a['ari_before']:.3f} -> {a['ari_after']:.3f} | "
                  f"{a['knn_accuracy_before']:.3f} -> {a['knn_accuracy_after']:.3f} |")
    rows = [(s, m, v, results[s][m][PAPER_METRIC.get(s, "accuracy")]) for s, per in PAPER_GPT2_SMALL.items()
            if s in results for m, v in per.items() if m in results[s]]
    if rows:
        print("\nBeside the paper's GPT2-Small figures (Table 3; macro-F1 for trec, accuracy otherwise):\n")
        print("| data | method | paper (GPT2-Small, full data) | ours (default model, subsets) |")
        print("|---|---|---|---|")
        for s, m, paper, ours in rows:
            print(f"| {s} | {m} | {paper:.3f} | {ours:.3f} |")
    holdout = [s for s in sets if any(r.get("test_is_train_holdout") for r in results[s].values())]
    sizes = {s: next(iter(results[s].values())) for s in sets}
    print("\nSubsets: " + ", ".join(f"{s} {sizes[s]['train_size']} train / {sizes[s]['test_size']} test"
                                     for s in sets) + ".")
    if holdout:
        print(f"Test split without usable labels, scored on a stratified hold-out of train: {', '.join(holdout)}.")


if __name__ == "__main__":
    main(sys.argv[1])
