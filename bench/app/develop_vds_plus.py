"""vds+ design choices compared on the training splits only (never a test split).

For each data set and seed: the evaluation's seeded, stratified training subset (256 examples by
default) is cut into 4 outer folds (every fourth row of a seeded permutation); a vds+ classifier
with the given options is fitted on three (making its own inner choices there) and scored on the
fourth; the accuracy printed is over all four held-out folds. The representations come from the
evaluation's disk cache.

    python bench/app/develop_vds_plus.py '{"folds": 4, "ensemble": true}' --seeds 2

prints one line per set (outer accuracy, seconds, each outer fold's choice) and the mean; the
comparisons behind the defaults are in bench/results/eval/vds-plus-development.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from vocabsem_fast.app.data import load_folder
from vocabsem_fast.app.models import load_model
from vocabsem_fast.app.tasks import Task, head_logits
from vocabsem_fast.app.vds_plus import PlusConfig, VDSPlusClassifier

SETS = ("sst2", "subj", "agnews", "mr", "trec", "cb", "rte")


def outer_accuracy(model, tokenizer, folder: Path, config: PlusConfig, seed: int, train_limit: int,
                   folds: int) -> tuple[float, list[str]]:
    task = Task(model, tokenizer, load_folder(folder), train_limit=train_limit, test_limit=250, seed=seed,
                progress=False)
    reps, labels = task.representations("train"), task.labels("train")  # float32: those of the disk cache
    prior = torch.log_softmax(head_logits(task.model, reps.last, task.next_token_ids), dim=-1)
    basis = task.basis
    correct, chosen = 0, []
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1000 + seed))
    for k in range(folds):
        held = order[k::folds]
        fit = order[torch.isin(order, held, invert=True)].sort().values
        classifier = VDSPlusClassifier(basis.for_words(task.words), replace(config, seed=seed), bases=basis.vectors,
                                       label_token_ids=basis.token_ids(task.words))
        classifier.fit(reps[fit], prior[fit], labels[fit])
        correct += int((classifier.predict(reps[held], prior[held]) == labels[held]).sum())
        c = classifier.choice
        chosen.append(f"{c.training}/prior {c.prior_weight:g}/{c.epochs} epochs")
    return correct / len(labels), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("options", help="PlusConfig fields as JSON, e.g. '{\"folds\": 1}'")
    parser.add_argument("--seeds", default="2", help="comma-separated seeds (default 2)")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set names")
    parser.add_argument("--data", default="../shared/data", help="folder holding the sets")
    parser.add_argument("--train-limit", type=int, default=256)
    parser.add_argument("--outer-folds", type=int, default=4)
    args = parser.parse_args()
    config = PlusConfig(**json.loads(args.options))
    torch.set_num_threads(1)  # as the evaluation's timings: one core per run
    model, tokenizer = load_model(verbose=False)
    scores, start = [], time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.sets.split(","):
            t0 = time.perf_counter()
            accuracy, chosen = outer_accuracy(model, tokenizer, Path(args.data) / name, config, seed,
                                              args.train_limit, args.outer_folds)
            scores.append(accuracy)
            print(f"{name} seed {seed}: {accuracy:.3f} ({time.perf_counter() - t0:.1f} s) {chosen}", flush=True)
    print(f"mean {sum(scores) / len(scores):.4f} over {len(scores)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
