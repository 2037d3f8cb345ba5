"""Choose the semantic clustering module's defaults on validation data, never on a test split.

For each data set: the seeded, stratified 1000-example training subset that the evaluation uses
(its representations come from the evaluation's disk cache), split again into 800 to fit and 200
to validate. Each configuration is fitted on the 800 and scored on the 200.

    python bench/app/sweep_vds.py --data ../shared/data/sst2 --data ../shared/data/agnews ... \
        --out bench/results/eval/vds-sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from vocabsem_fast.app.data import load_folder, stratified_subset
from vocabsem_fast.app.evaluation import scores
from vocabsem_fast.app.models import load_model
from vocabsem_fast.app.semantic_clustering import FitConfig, VDSClassifier
from vocabsem_fast.app.tasks import Task

CONFIGS = {
    "scale=10": FitConfig(scale=10.0),
    "scale=20 (default)": FitConfig(),
    "scale=40": FitConfig(scale=40.0),
    "epochs=10": FitConfig(epochs=10),
    "lr=3e-3": FitConfig(lr=3e-3),
    "attention=last": FitConfig(attention="last"),
    "attention=none": FitConfig(attention="none"),
    "train=sm-gt": FitConfig(train_logits="sm-gt"),
}



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--train-limit", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("default")
    results = {}
    for folder in args.data:
        task = Task(model, tokenizer, load_folder(folder), train_limit=args.train_limit, test_limit=1, seed=args.seed)
        reps, labels = task.representations("train"), task.labels("train")
        positions = {id(e): i for i, e in enumerate(task.train)}
        held = stratified_subset(task.train, args.validation, args.seed + 1)
        val = torch.tensor([positions[id(e)] for e in held])
        fit = torch.tensor(sorted(set(range(len(task.train))) - set(val.tolist())))
        basis = task.basis
        ids = basis.token_ids(task.words)
        results[task.data.name] = {}
        for name, config in CONFIGS.items():
            start = time.perf_counter()
            clf = VDSClassifier(basis.vectors, ids, config=replace(config, seed=args.seed))
            clf.fit(reps[fit], labels[fit])
            r = scores(labels[val], clf.predict(reps[val]), task.num_classes)
            r["fit_seconds"] = time.perf_counter() - start
            results[task.data.name][name] = r
            print(f"{task.data.name:<8} {name:<20} acc {r['accuracy']:.3f}  F1 {r['macro_f1']:.3f}  "
                  f"({r['fit_seconds']:.1f} s)", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump({"fit": len(fit), "validation": args.validation, "results": results}, f, indent=2)
    print("\nmean validation accuracy over the data sets:")
    for name in CONFIGS:
        mean = sum(results[d][name]["accuracy"] for d in results) / len(results)
        print(f"  {name:<20} {mean:.3f}")


if __name__ == "__main__":
    main()
