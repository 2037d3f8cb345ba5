"""Does the classifier a user keeps score what the evaluation reports? For each data set and
method: ``vocabsem eval`` on a seeded split, then, each in a fresh process, ``vocabsem train`` on
the same training subset and ``vocabsem predict`` on the same test subset written as JSON lines;
the accuracy of the predictions against the evaluation's.

    python bench/app/reproduce_eval.py --sets trec,sst2,cb --methods vds+,probe,vds \\
        > bench/results/eval/train-predict-reproduction.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vocabsem_fast.app.data import load_folder


def run(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run(["vocabsem", *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    parser.add_argument("--sets", default="trec,sst2,cb")
    parser.add_argument("--methods", default="vds+,probe,vds")
    parser.add_argument("--train-limit", type=int, default=256)
    parser.add_argument("--test-limit", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    limits = ["--train-limit", str(args.train_limit), "--seed", str(args.seed)]
    print(f"Seed {args.seed}, {args.train_limit} training / {args.test_limit} test examples per set; "
          f"`python bench/app/reproduce_eval.py --sets {args.sets} --methods {args.methods}`.\n")
    print("| set | method | eval accuracy | train + predict accuracy | equal | train s | predict s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.sets.split(","):
            folder = Path(args.data) / name
            data = load_folder(folder)
            test = data.with_labelled_test(args.seed).subset("test", args.test_limit, args.seed)
            inputs = work / f"{name}-test.jsonl"
            inputs.write_text("".join(json.dumps({"id": i, **e.fields}) + "\n" for i, e in enumerate(test)))
            evaluated = work / f"{name}-eval.json"
            run("eval", "--data", str(folder), "--methods", args.methods, "--test-limit", str(args.test_limit),
                "--no-cache", "--out", str(evaluated), *limits)
            results = json.loads(evaluated.read_text())[name]
            for method in args.methods.split(","):
                classifier = work / f"{name}-{method}"
                train_s = run("train", "--data", str(folder), "--method", method, "--out", str(classifier), *limits)
                predictions = work / f"{name}-{method}.jsonl"
                predict_s = run("predict", str(classifier), "--input", str(inputs), "--out", str(predictions))
                labels = [json.loads(line)["label"] for line in predictions.read_text().splitlines()]
                accuracy = sum(p == e.label for p, e in zip(labels, test)) / len(test)
                print(f"| {name} | {method} | {results[method]['accuracy']:.3f} | {accuracy:.3f} | "
                      f"{'yes' if abs(accuracy - results[method]['accuracy']) < 1e-9 else 'no'} | {train_s:.0f} | "
                      f"{predict_s:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
