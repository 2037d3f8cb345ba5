"""How fast, and how faithfully, the frozen forward passes extract representations in each
precision: the fp32 model, a bf16 copy of it, fp32 under bf16 autocast, and dynamic int8
quantisation of its linear layers.

On the seeded training prompts of one set: each variant's best of three wall times (variants
interleaved so that drift on the machine hits all alike) and the cosine of its representations
(last layer's last token, the inner layer's token mean) to the fp32 ones.

    python bench/app/extraction_precision.py --data ../shared/data/sst2 \
        > bench/results/eval/extraction-precision.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_layers import cpu_name

from vocabsem_fast.app.data import load_folder
from vocabsem_fast.app.models import load_model, native_bfloat16
from vocabsem_fast.app.representations import extract
from vocabsem_fast.app.tasks import Task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/sst2", help="the set whose training prompts are used")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(verbose=False)
    task = Task(model, tokenizer, load_folder(Path(args.data)), train_limit=args.prompts, test_limit=8, seed=0,
                use_cache=False, progress=False)
    prompts = task.prompts("train")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    def run(variant: str):
        if variant == "autocast bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return extract(model, tokenizer, prompts, use_cache=False, progress=False)
        chosen = {"fp32": model, "bf16 copy": bf16, "int8 dynamic": int8}[variant]
        return extract(chosen, tokenizer, prompts, use_cache=False, progress=False)

    variants = ("fp32", "bf16 copy", "autocast bf16", "int8 dynamic")
    times = {v: [] for v in variants}
    reps = {}
    for _ in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            reps[v] = run(v)
            times[v].append(time.perf_counter() - start)

    print(f"# Extraction precision on {len(prompts)} training prompts of {Path(args.data).name}\n")
    print(f"Machine: {cpu_name()}, {args.threads} thread(s), native bf16: "
          f"{native_bfloat16(torch.device('cpu'))}; torch {torch.__version__}. Default model. Command:\n")
    print(f"    python bench/app/extraction_precision.py --data {args.data} --prompts {args.prompts} "
          f"--threads {args.threads}\n")
    print(f"| variant | best of {args.repeats} (s) | speed-up | cos last (min / mean) | cos inner mean (min / mean) |")
    print("|---|---|---|---|---|")
    base = min(times["fp32"])
    for v in variants:
        last = F.cosine_similarity(reps[v].last.float(), reps["fp32"].last.float(), dim=-1)
        inner = F.cosine_similarity(reps[v].inner_mean.float(), reps["fp32"].inner_mean.float(), dim=-1)
        print(f"| {v} | {min(times[v]):.2f} | {base / min(times[v]):.2f}x | {last.min():.4f} / {last.mean():.4f} "
              f"| {inner.min():.4f} / {inner.mean():.4f} |")


if __name__ == "__main__":
    main()
