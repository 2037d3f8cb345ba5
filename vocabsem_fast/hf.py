"""Similarity logits inside Hugging Face causal LMs.

``use_similarity_logits(model, scale=...)`` swaps the model's output head for a
``SimilarityHead``: ``model(...)``, ``model.generate()`` and training with ``labels`` then use
``scale * cos(hidden, basis)`` logits over the semantic bases (computed from the original head
and cached, as ``SemanticBasis.from_model``). The switch is reversible (``.restore()``, or use it
as a context manager).

Two fused paths avoid the N x V logits that a head module must return:
``similarity_lm_loss`` (next-token similarity cross-entropy from the backbone's hidden states)
and ``greedy_generate`` (the argmax of each step by the fused top-k, never a vocabulary row).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bases import SemanticBasis
from .ops import similarity_cross_entropy, similarity_logits, similarity_topk


class SimilarityHead(nn.Module):
    """An LM head whose logits are ``scale * cos(hidden, bases[v])``."""

    def __init__(self, bases: Tensor, scale: float, eps: float = 1e-8):
        super().__init__()
        self.register_buffer("bases", bases, persistent=False)
        self.scale = float(scale)
        self.eps = eps

    @property
    def weight(self) -> Tensor:  # what code that inspects a head's shape (V, d) expects
        return self.bases

    def forward(self, hidden: Tensor) -> Tensor:
        return similarity_logits(hidden, self.bases.to(hidden.dtype), scale=self.scale, eps=self.eps)


class SimilaritySwitch:
    """Handle of a head swap: ``restore()`` puts the original head back."""

    def __init__(self, model, original: nn.Module, head: SimilarityHead):
        self.model, self.original, self.head = model, original, head

    def restore(self):
        if self.model.get_output_embeddings() is self.head:
            self.model.set_output_embeddings(self.original)
        return self.model

    def __enter__(self) -> SimilaritySwitch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _original_head(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("this model has no output head (get_output_embeddings() is None)")
    if isinstance(head, SimilarityHead):
        raise ValueError("this model already uses similarity logits: restore() the previous switch first")
    return head


def use_similarity_logits(model, *, scale: float = 20.0, bases: Tensor | None = None,
                          tokenizer=None) -> SimilaritySwitch:
    """Swap ``model``'s head for a ``SimilarityHead`` over ``bases`` (default: the semantic bases
    of the current head, from the disk cache). Returns the switch; ``.restore()`` undoes it."""
    head = _original_head(model)
    if bases is None:
        bases = SemanticBasis.from_model(model, tokenizer=tokenizer).vectors
    weight = head.weight
    if bases.shape != weight.shape:
        raise ValueError(f"bases must have the head's shape {tuple(weight.shape)}, got {tuple(bases.shape)}")
    similarity = SimilarityHead(bases.to(weight.device, weight.dtype), scale)
    model.set_output_embeddings(similarity)
    return SimilaritySwitch(model, head, similarity)


def _backbone(model):
    """The transformer under the head (through a peft wrapper, whose adapters live in it)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def _backbone_states(model, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state, out  # after the final norm: what the head reads


def similarity_lm_loss(model, input_ids: Tensor, bases: Tensor, *, scale: float, labels: Tensor | None = None,
                       attention_mask: Tensor | None = None, ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """Mean next-token similarity cross-entropy of a causal LM, fused (no N x V logits):
    ``labels`` default to ``input_ids``; position i predicts label i + 1, as in Hugging Face."""
    hidden, _ = _backbone_states(model, input_ids, attention_mask)
    labels = input_ids if labels is None else labels
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    return similarity_cross_entropy(hidden[:, :-1], bases.to(hidden.dtype), targets, scale=scale,
                                    ignore_index=ignore_index, impl=impl)


@torch.no_grad()
def greedy_generate(model, input_ids: Tensor, bases: Tensor, *, max_new_tokens: int, scale: float = 1.0,
                    eos_token_id: int | None = None, impl: str = "auto") -> Tensor:
    """Greedy decoding by similarity: each step's token is the fused top-1 of the last hidden
    state against ``bases`` (the vocabulary row is never formed), with the model's KV cache.
    ``input_ids`` is (B, T) without padding; returns (B, T + generated)."""
    sequences = input_ids
    hidden, out = _backbone_states(model, input_ids, use_cache=True)
    past = out.past_key_values
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        _, best = similarity_topk(hidden[:, -1], bases.to(hidden.dtype), k=1, scale=scale, impl=impl)
        token = best[:, 0]
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
        hidden, out = _backbone_states(model, token[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
    return sequences
