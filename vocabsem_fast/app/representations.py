"""Frozen-LM representations of prompts: the last layer's hidden state (after the final norm)
at the last prompt token, plus its mean and max over the prompt's tokens; and the last-token
state and token mean of one inner layer (three quarters of the depth), which ``vds+`` reads.

Batches are left-padded with explicit position ids, so a prompt gets the same representation
alone or beside longer ones. Results are cached on disk, keyed by the model's head weights and
configuration and by the exact prompts, so a second run does no forward passes.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ..bases import lm_head_weight
from ..cache import content_key, default_cache_dir, load_tensors, save_tensors, tensor_sha256

_FORMAT = "vocabsem_fast.representations/4"

# Where the inner layer sits, as a fraction of the depth. Linear probes on the training splits of
# the seven shared sets (4-fold cross-validation, default model) are best at layers 22-23 of 30,
# above the last layer (bench/results/eval/layer-probes.md).
INNER_DEPTH = 0.75


def inner_layer(num_layers: int) -> int:
    """Index into a model's ``hidden_states`` (0: the embeddings) of the inner layer: three
    quarters of the depth, rounded down, at least the first layer."""
    return max(1, min(num_layers, int(INNER_DEPTH * num_layers)))


@dataclass
class Representations:
    last: Tensor  # (M, d) last prompt token, last layer, after the final norm
    mean: Tensor  # (M, d) mean over the prompt's tokens of the same layer
    max: Tensor   # (M, d) elementwise max over the prompt's tokens
    inner_last: Tensor | None = None  # (M, d) last prompt token of the inner layer (no norm)
    inner_mean: Tensor | None = None  # (M, d) its mean over the prompt's tokens

    def __len__(self) -> int:
        return self.last.shape[0]

    def __getitem__(self, index) -> Representations:
        """The rows ``index`` of every field."""
        return Representations(*(None if (t := getattr(self, name)) is None else t[index] for name in _KINDS))


_KINDS = tuple(f.name for f in fields(Representations))  # the cached tensors, in field order


def model_fingerprint(model) -> str:
    """Identifies a model for caching: its configuration and the hash of its head weights."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    digest.update(tensor_sha256(lm_head_weight(model)).encode())
    return digest.hexdigest()


# A prompt keeps at most this many of its last tokens (or the model's context, if shorter): the
# end of a prompt holds the answer cue, and a batch of a few long texts must not exhaust memory.
MAX_PROMPT_TOKENS = 2048


def context_limit(model, cap: int) -> int:
    """Tokens a prompt may hold: the model's positions, at most ``cap``."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(cap, positions) if positions else cap


def _cache_entry(cache_dir: Path, fingerprint: str, prompts: list[str], max_tokens: int) -> tuple[Path, str]:
    """``(path, key)`` of the cache entry for these prompts under this model."""
    key = content_key({"entry": _FORMAT, "model": fingerprint, "prompts": prompts, "max_tokens": max_tokens})
    return cache_dir / f"reps-{key[:32]}.safetensors", key


def batch_inputs(tokenizer, prompts: list[str], device, *, max_length: int | None = None):
    """``(input_ids, attention_mask, position_ids)`` of a left-padded batch, so that every prompt
    ends at the last column. ``max_length`` keeps a long prompt's last tokens."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, truncation=max_length is not None,
                        max_length=max_length)
    ids = encoded["input_ids"].to(device)
    mask = encoded["attention_mask"].to(device)
    return ids, mask, _positions(mask)


def _positions(mask: Tensor) -> Tensor:
    # positions count real tokens only, so left padding does not shift them
    return (mask.cumsum(-1) - 1).clamp_min(0)


def tokenize(tokenizer, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Each prompt's token ids, a long one keeping its last ``max_tokens`` (the end holds the
    answer cue), and how many were cut. Prompts are tokenized once, unpadded."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    ids = tokenizer(list(prompts))["input_ids"] if prompts else []
    long = [i for i, row in enumerate(ids) if len(row) > max_tokens]
    if long:  # rare: tokenized again with truncation, which keeps special tokens where the tokenizer adds them
        cut = tokenizer([prompts[i] for i in long], truncation=True, max_length=max_tokens)["input_ids"]
        for i, row in zip(long, cut):
            ids[i] = row
    return ids, len(long)


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        if row:
            ids[k, width - len(row):] = torch.tensor(row)
            mask[k, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _layer_list(decoder, num_layers: int):
    """The decoder's stack of ``num_layers`` blocks (``layers``, ``h``, ...), or None."""
    for child in decoder.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers:
            return child
    return None


class _Reader:
    """What one forward pass keeps of a model: the last layer after the final norm (the base
    model's output: the head never runs) and the inner layer's output, caught by a hook. No
    other layer's states are held, and no logits are computed. Models whose blocks cannot be
    found fall back to ``output_hidden_states`` and the head at one position."""

    def __init__(self, model):
        self.model = model
        num_layers = model.config.num_hidden_layers
        self.inner = inner_layer(num_layers)
        decoder = getattr(model, "base_model", None)
        layers = None if decoder is None or decoder is model else _layer_list(decoder, num_layers)
        self.decoder = decoder if layers is not None else None
        # hidden_states[k] is block k-1's output, except the last entry, which is normed
        self.block = layers[self.inner - 1] if layers is not None and self.inner < num_layers else None
        self.skip_logits = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters
                            else {})

    def __call__(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(last, inner): (batch, tokens, d) states of the last and the inner layer."""
        positions = _positions(mask)
        if self.decoder is None:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                             **self.skip_logits)
            return out.hidden_states[-1], out.hidden_states[self.inner]
        caught = []

        def catch(module, args, output):
            caught.append(output[0] if isinstance(output, tuple) else output)

        handle = self.block.register_forward_hook(catch) if self.block is not None else None
        try:
            last = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                use_cache=False).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        return last, caught[0] if caught else last


@torch.no_grad()
def _encode_batch(reader: _Reader, ids: Tensor, mask: Tensor) -> Representations:
    last, inner = reader(ids, mask)
    states, inner = last.float(), inner.float()
    keep = mask.bool().unsqueeze(-1)
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(states.dtype)

    def token_mean(x: Tensor) -> Tensor:
        return (torch.where(keep, x, 0.0).sum(1) / count).cpu()

    peak = torch.where(keep, states, float("-inf")).amax(1)
    # the last token's rows copied out: a view would keep the batch's whole (batch, tokens, d)
    # states alive until every batch is done, memory growing with the number of prompts
    return Representations(states[:, -1].clone().cpu(), token_mean(states), peak.cpu(), inner[:, -1].clone().cpu(),
                           token_mean(inner))


def encode(model, tokenizer, prompts: list[str], *, batch_size: int = 16, progress: bool = False,
           desc: str = "representations") -> Representations:
    """Representations of ``prompts`` (in order) by frozen forward passes, no cache: prompts are
    tokenized once and batched longest first, so a batch holds prompts of similar length and
    wastes little on padding. The batches depend on the set of prompts only, not their order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_tokens = context_limit(model, MAX_PROMPT_TOKENS)
    rows, too_long = tokenize(tokenizer, list(prompts), max_tokens)
    if too_long:
        warnings.warn(f"{too_long} of {len(prompts)} prompts are longer than {max_tokens} tokens (the model's "
                      f"context or the cap MAX_PROMPT_TOKENS): each keeps its last {max_tokens} tokens",
                      stacklevel=3)
    if not rows:
        d = model.config.hidden_size
        return Representations(*(torch.empty(0, d) for _ in _KINDS))
    # ties broken by the text, not the position: the same prompts make the same batches in any
    # input order, so a prompt's representation does not depend on where it stood
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), prompts[i]))
    reader, device = _Reader(model), next(model.parameters()).device
    parts = []
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    for start in batches:
        ids, mask = _left_padded([rows[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id, device)
        parts.append(_encode_batch(reader, ids, mask))
    stacked = {name: torch.cat([getattr(p, name) for p in parts]) for name in _KINDS}
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Representations(*(stacked[name][inverse] for name in _KINDS))


def extract(model, tokenizer, prompts: list[str], *, batch_size: int = 16, cache_dir: str | os.PathLike | None = None,
            use_cache: bool = True, progress: bool = True, desc: str = "representations") -> Representations:
    """Representations of ``prompts`` (in order), computed by ``encode`` or read from the cache."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "representations"
    path = key = None
    if use_cache:
        path, key = _cache_entry(directory, model_fingerprint(model), list(prompts),
                                 context_limit(model, MAX_PROMPT_TOKENS))
        # a damaged or stale entry warns and gives None: recompute, and overwrite it below
        saved = load_tensors(path, key, names=_KINDS)
        if saved is not None:
            return Representations(*(saved[name] for name in _KINDS))
    reps = encode(model, tokenizer, prompts, batch_size=batch_size, progress=progress, desc=desc)
    if path is not None:
        save_tensors(path, key, {name: getattr(reps, name) for name in _KINDS})
    return reps
