"""What gradient filtering would skip in the triton backward, measured on real hidden states.

The triton backward can skip a (64 x 64) tile of the N x V gradient when every |softmax - target|
in it is below ``filter_eps`` (as Cut Cross-Entropy does). How many tiles that is depends on how
peaked the softmax is: the LM head's raw logits are peaked, the bounded cosine logits of this
package (scale * cos, |logit| <= scale) are flatter. This script takes the default model's
last-layer states (after the final norm) at every position of BBC News articles, with the next
token as target, and reports per setting the fraction of tiles skipped and the relative error
that skipping puts into the hidden-state gradient (computed exactly in float32 with torch;
the fraction of skipped tiles is the fraction of backward GEMM work saved).

    python bench/library/gradient_filtering.py --out bench/results/gradient-filtering.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from vocabsem_fast.app.data import load_bbc_news
from vocabsem_fast.app.models import load_model
from vocabsem_fast.bases import SemanticBasis

TILE = 64


def hidden_states(model, tokenizer, texts: list[str], tokens_per_text: int):
    states, targets = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : tokens_per_text + 1]
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], output_hidden_states=True)
        states.append(out.hidden_states[-1][0])
        targets.append(ids[0, 1:])
    return torch.cat(states), torch.cat(targets)


def filtering(logits: torch.Tensor, targets: torch.Tensor, bases: torch.Tensor, eps_values: list[float]) -> dict:
    n, v = logits.shape
    grad = torch.softmax(logits, dim=-1)
    grad[torch.arange(n), targets] -= 1.0
    pad_n, pad_v = -n % TILE, -v % TILE
    tiles = F.pad(grad.abs(), (0, pad_v, 0, pad_n)).view((n + pad_n) // TILE, TILE, (v + pad_v) // TILE, TILE)
    tile_max = tiles.amax(dim=(1, 3))
    exact = grad @ bases
    out = {}
    for eps in eps_values:
        skipped = tile_max < eps
        keep = (~skipped).repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:n, :v]
        approx = torch.where(keep, grad, 0.0) @ bases
        out[f"{eps:.3g}"] = {"tiles_skipped": float(skipped.float().mean()),
                             "relative_error_grad_hidden": float((approx - exact).norm() / exact.norm())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_model("default")
    data = load_bbc_news(opening_chars=2000)
    texts = [f"{e.fields['title']}\n{e.fields['body']}" for e in data.train[: args.texts]]
    states, targets = hidden_states(model, tokenizer, texts, args.tokens)
    head = model.get_output_embeddings().weight.detach().float()
    bases = SemanticBasis.from_model(model, tokenizer=tokenizer).vectors.float()
    eps_values = [2.0**-16, 2.0**-12, 2.0**-8]
    settings = {
        "LM head, raw logits": (states @ head.T, head),
        "similarity, scale 20": (20.0 * F.normalize(states, dim=-1) @ F.normalize(bases, dim=-1).T,
                                 F.normalize(bases, dim=-1)),
        "similarity, scale 50": (50.0 * F.normalize(states, dim=-1) @ F.normalize(bases, dim=-1).T,
                                 F.normalize(bases, dim=-1)),
    }
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "rows": int(states.shape[0]), "vocabulary": int(head.shape[0]), "tile": TILE, "settings": {}}
    for name, (logits, b) in settings.items():
        probs = torch.softmax(logits, -1)
        entry = filtering(logits, targets, b, eps_values)
        entry["mean_max_probability"] = float(probs.max(-1).values.mean())
        entry["mean_loss"] = float(F.cross_entropy(logits, targets))
        results["settings"][name] = entry
        print(f"{name}: max p {entry['mean_max_probability']:.3f}, loss {entry['mean_loss']:.2f}; "
              + "; ".join(f"eps {k}: {e['tiles_skipped']:.1%} skipped, error {e['relative_error_grad_hidden']:.1e}"
                          for k, e in entry.items() if isinstance(e, dict)))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
