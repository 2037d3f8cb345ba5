"""Similarity logits inside Hugging Face causal LMs.

``use_similarity_logits(model, scale=...)`` swaps the model's output head for a
``SimilarityHead``: ``model(...)`` and ``model.generate()`` then use ``scale * cos(hidden,
basis)`` logits over the semantic bases (computed from the original head and cached, as
``SemanticBasis.from_model``). With ``fused_loss=True`` (the default), ``model(input_ids,
labels=...)`` — what ``transformers.Trainer`` calls — computes the next-token loss by the fused
op from the backbone's hidden states and never forms the (B, T, V) logits. The switch is
reversible (``.restore()``, or use it as a context manager).

Two more fused paths: ``similarity_lm_loss`` (the same loss as a function) and
``greedy_generate`` (the argmax of each step by the fused top-k, never a vocabulary row).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_bool
from .bases import SemanticBasis
from .ops import autocast_dtype, similarity_cross_entropy, similarity_logits, similarity_topk


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the similarity ops will run in for ``hidden`` (autocast's, where it is on)."""
    return autocast_dtype(hidden) or hidden.dtype


class SimilarityHead(nn.Module):
    """An LM head whose logits are ``scale * cos(hidden, bases[v])``.

    The bases are a buffer (they follow ``model.to()``); a copy in another dtype (a bf16 model
    under autocast, fp32 bases) is made once and kept until the bases change, not per call."""

    def __init__(self, bases: Tensor, scale: float, eps: float = 1e-8):
        super().__init__()
        self.register_buffer("bases", bases, persistent=False)
        self.scale = float(scale)
        self.eps = eps
        self.passthrough = False  # set by the fused loss: the model's forward then hands back its hidden states
        self._casts: dict[torch.dtype, tuple[tuple, Tensor]] = {}

    @property
    def weight(self) -> Tensor:  # what code that inspects a head's shape (V, d) expects
        return self.bases

    def bases_in(self, dtype: torch.dtype) -> Tensor:
        """The bases in ``dtype``: the buffer itself, or a copy cast once per dtype."""
        bases = self.bases
        if dtype == bases.dtype:
            return bases
        stamp = (bases.data_ptr(), bases._version, bases.device)
        cached = self._casts.get(dtype)
        if cached is None or cached[0] != stamp:
            cached = (stamp, bases.detach().to(dtype))
            self._casts[dtype] = cached
        return cached[1]

    def forward(self, hidden: Tensor) -> Tensor:
        if self.passthrough:
            return hidden
        return similarity_logits(hidden, self.bases_in(_compute_dtype(hidden)), scale=self.scale, eps=self.eps)


def next_token_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Position i's target is label i + 1 (the last position has none): Hugging Face's shift,
    done on the labels, so the hidden states are used whole and never copied."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _lm_loss(hidden: Tensor, head: SimilarityHead, targets: Tensor, *, num_items_in_batch=None,
             ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """Mean over the non-ignored targets, or their sum divided by ``num_items_in_batch`` (what a
    gradient-accumulating Trainer counts over all micro-batches of a step)."""
    bases = head.bases_in(_compute_dtype(hidden))
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = similarity_cross_entropy(hidden, bases, targets, scale=head.scale, eps=head.eps, ignore_index=ignore_index,
                                    reduction=reduction, impl=impl)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class SimilaritySwitch:
    """Handle of a head swap: ``restore()`` puts the original head (and forward) back.

    ``return_logits`` (default False): whether ``model(..., labels=...)`` under the fused loss
    also returns the similarity logits (formed in full, as the head would)."""

    def __init__(self, model, original: nn.Module, head: SimilarityHead, *, fused_loss: bool = False,
                 return_logits: bool = False):
        self.model, self.original, self.head = model, original, head
        self.return_logits = return_logits
        self._patched = None
        if fused_loss:
            self._patched = _language_model(model)
            self._patched.forward = _fused_forward(self, self._patched.forward)

    @property
    def fused_loss(self) -> bool:
        return self._patched is not None

    def restore(self):
        if self._patched is not None and "forward" in vars(self._patched):
            del self._patched.forward  # the class's forward again
        self._patched = None
        if self.model.get_output_embeddings() is self.head:
            self.model.set_output_embeddings(self.original)
        return self.model

    def __enter__(self) -> SimilaritySwitch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _language_model(model):
    """The causal LM itself (under a peft wrapper, whose forward calls the LM's)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fused_forward(switch: SimilaritySwitch, forward):
    """``forward`` with the fused next-token loss when labels are given: the model's own forward
    runs with the head handing back its input (so everything else — peft adapters, caches,
    gradient checkpointing, extra outputs — is the model's), then the loss is the fused op's."""
    names = [name for name, p in inspect.signature(forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def fused(*args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"forward() takes at most {len(names)} positional arguments, got {len(args)}")
        kwargs.update(zip(names, args))
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return forward(**kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        return_dict = kwargs.pop("return_dict", None)
        if "logits_to_keep" in names:
            kwargs["logits_to_keep"] = 0  # every position has a target
        head = switch.head
        head.passthrough = True
        try:
            out = forward(return_dict=True, **kwargs)
        finally:
            head.passthrough = False
        hidden = out.logits
        targets = shift_labels if shift_labels is not None else next_token_targets(labels)
        loss = _lm_loss(hidden, head, targets.to(hidden.device), num_items_in_batch=num_items_in_batch)
        fields = {**out, "loss": loss, "logits": head(hidden) if switch.return_logits else None}
        out = type(out)(**fields)
        return out if return_dict is not False else out.to_tuple()

    fused.__wrapped__ = forward  # the signature Trainer and peft inspect
    return fused


def _original_head(model) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("this model has no output head (get_output_embeddings() is None)")
    if isinstance(head, SimilarityHead):
        raise ValueError("this model already uses similarity logits: restore() the previous switch first")
    return head


def use_similarity_logits(model, *, scale: float = 20.0, bases: Tensor | None = None, tokenizer=None,
                          fused_loss: bool = True, return_logits: bool = False) -> SimilaritySwitch:
    """Swap ``model``'s head for a ``SimilarityHead`` over ``bases`` (default: the semantic bases
    of the current head, from the disk cache). Returns the switch; ``.restore()`` undoes it.

    ``fused_loss=True``: while the switch is on, ``model(input_ids, labels=..., num_items_in_batch=...)``
    returns the next-token similarity cross-entropy from the fused op (labels shifted as Hugging
    Face shifts them, -100 ignored, a given ``num_items_in_batch`` dividing the summed loss) with
    ``logits=None`` (``return_logits=True`` keeps them). Without labels, and in ``generate()``,
    the model returns similarity logits."""
    fused_loss = check_bool(fused_loss, "fused_loss")
    return_logits = check_bool(return_logits, "return_logits")
    head = _original_head(model)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if fused_loss and cap is not None:
        raise ValueError(f"this model caps its logits (final_logit_softcapping={cap}), which the fused loss does "
                         "not apply: use fused_loss=False")
    if bases is None:
        bases = SemanticBasis.from_model(model, tokenizer=tokenizer).vectors
    weight = head.weight
    if bases.shape != weight.shape:
        raise ValueError(f"bases must have the head's shape {tuple(weight.shape)}, got {tuple(bases.shape)}")
    similarity = SimilarityHead(bases.to(weight.device, weight.dtype), scale)
    model.set_output_embeddings(similarity)
    return SimilaritySwitch(model, head, similarity, fused_loss=fused_loss, return_logits=return_logits)


def _backbone(model):
    """The transformer under the head (through a peft wrapper, whose adapters live in it)."""
    return _language_model(model).base_model


def _backbone_states(model, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state, out  # after the final norm: what the head reads


def similarity_lm_loss(model, input_ids: Tensor, bases: Tensor, *, scale: float, labels: Tensor | None = None,
                       attention_mask: Tensor | None = None, ignore_index: int = -100, num_items_in_batch=None,
                       impl: str = "auto") -> Tensor:
    """Next-token similarity cross-entropy of a causal LM, fused (no N x V logits): ``labels``
    default to ``input_ids``; position i predicts label i + 1, as in Hugging Face; positions the
    attention mask hides are ignored. Mean over the counted targets, or their sum divided by
    ``num_items_in_batch``."""
    hidden, _ = _backbone_states(model, input_ids, attention_mask)
    targets = next_token_targets(input_ids if labels is None else labels, ignore_index)
    if attention_mask is not None:
        targets = targets.masked_fill(next_token_targets(attention_mask, 0) == 0, ignore_index)
    head = SimilarityHead(bases, scale)
    return _lm_loss(hidden, head, targets, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                    impl=impl)


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
    bases = bases.to(hidden.dtype)  # once, not per step
    for _ in range(max_new_tokens):
        _, best = similarity_topk(hidden[:, -1], bases, k=1, scale=scale, impl=impl)
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
