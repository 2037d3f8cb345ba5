"""The vocabulary lens: which tokens' semantic bases each layer's hidden state is closest to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bases import SemanticBasis
from ..ops import similarity_topk
from .models import final_norm


@dataclass
class LayerTokens:
    layer: int  # 0 is the embedding output, i the output of block i
    token_ids: list[int]
    tokens: list[str]
    similarities: list[float]
    head_token: str  # top-1 of the model's own LM head on the same state (the classic logit lens)


@torch.no_grad()
def vocabulary_lens(model, tokenizer, basis: SemanticBasis, prompt: str, *, k: int = 5) -> list[LayerTokens]:
    """Top-k tokens by cosine similarity to the semantic bases, for the last position's hidden
    state after every layer. Intermediate layers pass through the model's final norm first (as
    the last one already has), so every row lives where the LM head reads."""
    encoded = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    outputs = model(**{key: value.to(device) for key, value in encoded.items()}, output_hidden_states=True)
    states = [h[0, -1] for h in outputs.hidden_states]
    norm = final_norm(model)
    if norm is not None:
        states = [norm(h) for h in states[:-1]] + [states[-1]]
    stacked = torch.stack(states).to(basis.vectors.dtype)
    values, indices = similarity_topk(stacked, basis.vectors.to(stacked.device), k)
    head_ids = model.get_output_embeddings()(stacked.to(model.dtype)).argmax(-1).tolist()
    rows = []
    for layer, (vals, ids) in enumerate(zip(values.tolist(), indices.tolist())):
        tokens = [tokenizer.decode([i]) for i in ids]
        rows.append(LayerTokens(layer, ids, tokens, vals, tokenizer.decode([head_ids[layer]])))
    return rows


def format_lens_table(rows: list[LayerTokens]) -> str:
    """A fixed-width table: one line per layer, tokens quoted so leading spaces show."""
    cells = [[f"{tok!r} {sim:.2f}" for tok, sim in zip(r.tokens, r.similarities)] for r in rows]
    k = len(cells[0]) if cells else 0
    widths = [max(len(c[j]) for c in cells) for j in range(k)]
    header = "layer  " + "  ".join(f"top-{j + 1} (cos)".ljust(widths[j]) for j in range(k)) + "  | head top-1"
    lines = [header, "-" * len(header)]
    for r, row_cells in zip(rows, cells):
        label = "emb" if r.layer == 0 else str(r.layer)
        body = "  ".join(c.ljust(widths[j]) for j, c in enumerate(row_cells))
        lines.append(f"{label:>5}  {body}  | {r.head_token!r}")
    return "\n".join(line.rstrip() for line in lines)
