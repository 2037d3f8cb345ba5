"""Peak memory of TextClassifier.predict_proba against the number of texts: the same 512 SST-2
sentences 1, 4 and 16 times over (the same batches, so only the count changes), after a warm-up
run over them. What grows with the count is the (M, C) result and, up to one chunk (1,024 texts),
the chunk's features; nothing else.

    python bench/app/predict_memory.py >> bench/results/predict-throughput.md
"""

from __future__ import annotations

import json
import time

import torch
from bench_predict_throughput import DATA, FIT

from vocabsem_fast.app import TextClassifier
from vocabsem_fast.app.memory import PeakMemory


def main() -> None:
    folder = DATA / "sst2"
    meta = json.loads((folder / "labels.json").read_text())
    rows = [json.loads(line) for line in open(folder / "train.jsonl")]
    clf = TextClassifier(meta["template"], meta["label_words"], **FIT)
    clf.fit([r["sentence"] for r in rows[-96:]], [str(r["label"]) for r in rows[-96:]])
    texts = [r["sentence"] for r in rows[:512]]
    clf.predict_proba(texts)  # warm: the bfloat16 copy and every batch shape once
    print("\n### peak memory against the number of texts (the same 512 short texts repeated)\n")
    print("| texts | seconds | texts/s | peak MiB added |")
    print("|---|---|---|---|")
    for times in (1, 4, 16):
        start = time.perf_counter()
        with PeakMemory() as peak:
            clf.predict_proba(texts * times)
        seconds = time.perf_counter() - start
        print(f"| {512 * times} | {seconds:.1f} | {512 * times / seconds:.1f} | {peak.above_start_mib:.0f} |",
              flush=True)
    print(f"\n(torch {torch.__version__}; `python bench/app/predict_memory.py`)")


if __name__ == "__main__":
    main()
