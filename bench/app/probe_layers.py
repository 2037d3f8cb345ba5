"""Which layer to read besides the last: linear probes of every layer, scored by cross-validation
on the training splits only (never a test split).

For each data set: the seeded, stratified training subset of the evaluation (256 examples by
default); for each layer, a standardised logistic-regression probe (C = 0.1) on the concatenated
last-token state and token mean, its accuracy by 4-fold stratified cross-validation.

    python bench/app/probe_layers.py --data ../shared/data/sst2 ... > bench/results/eval/layer-probes.md
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from vocabsem_fast.app.data import load_folder
from vocabsem_fast.app.models import load_model
from vocabsem_fast.app.representations import MAX_PROMPT_TOKENS, batch_inputs, context_limit, inner_layer
from vocabsem_fast.app.tasks import Task


@torch.no_grad()
def layer_states(model, tokenizer, prompts: list[str], batch_size: int = 16) -> np.ndarray:
    """(M, layers + 1, 2d): every hidden state's last-token vector and token mean per prompt."""
    max_tokens = context_limit(model, MAX_PROMPT_TOKENS)
    rows = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, positions = batch_inputs(tokenizer, [prompts[i] for i in idx], "cpu", max_length=max_tokens)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        states = torch.stack(out.hidden_states, 1).float()  # (B, layers + 1, T, d), left-padded
        keep = mask[:, None, :, None].float()
        mean = (states * keep).sum(2) / keep.sum(2)
        both = torch.cat([states[:, :, -1], mean], -1)
        for j, i in enumerate(idx):
            rows[i] = both[j].numpy()
    return np.stack(rows)


def cpu_name() -> str:
    """'2-core AMD EPYC': the cores and the model name, for the results' headers."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "CPU"
    return f"{os.cpu_count()}-core {name}"


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--train-limit", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model(verbose=False)
    table = {}
    for path in args.data:
        task = Task(model, tokenizer, load_folder(path), args.train_limit, 1, args.seed, progress=False)
        features, labels = layer_states(model, tokenizer, task.prompts("train")), task.labels("train").numpy()
        folds = StratifiedKFold(4, shuffle=True, random_state=args.seed)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        table[task.data.name] = [cross_val_score(probe, features[:, layer], labels, cv=folds).mean()
                                 for layer in range(features.shape[1])]
    layers = len(next(iter(table.values())))
    mean = np.mean(list(table.values()), 0)
    print("# Linear probes of every layer (training splits, 4-fold cross-validation)\n")
    print(f"Default model ({layers - 1} layers; 0 = embeddings, {layers - 1} = last, after the final norm), "
          f"{args.train_limit} training examples per set, seed {args.seed}; {cpu_name()}, "
          f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s. Command:\n")
    print("    python bench/app/probe_layers.py " + " ".join(f"--data {p}" for p in args.data)
          + " > bench/results/eval/layer-probes.md\n")
    print("Accuracy of a standardised logistic probe (C = 0.1) on the last-token state and token mean of "
          "each layer.\n")
    print("| layer | " + " | ".join(table) + " | mean |")
    print("|---" * (len(table) + 2) + "|")
    for layer in range(layers):
        print(f"| {layer} | " + " | ".join(f"{v[layer]:.3f}" for v in table.values()) + f" | {mean[layer]:.3f} |")
    best = int(np.argmax(mean))
    print(f"\nBest mean: layer {best} ({mean[best]:.3f}); the last layer {mean[-1]:.3f}. vds+ reads layer "
          f"{inner_layer(layers - 1)} (`INNER_DEPTH` = 0.75 of the depth) besides the last.")


if __name__ == "__main__":
    main()
