"""Semantic bases: the latent vector the LM head maps closest to each token's one-hot.

For an LM head L (V x d, logits = h @ L.T) the basis of token i is s_i = e_i (L.T)^+, row i of
``pinv(L).T``. Computed in float64; a Hugging Face model's bases are cached on disk, keyed by a
hash of its head weights.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._validation import check_finite, check_float, check_number
from .cache import content_key, default_cache_dir, load_tensors, save_tensors

_CACHE_FORMAT = "vocabsem_fast.semantic_bases/2"
# Heads already hashed in this process, with the state they were hashed in and their bases.
# Hashing a large head costs a pass over it; a second switch on the same, unchanged head skips it.
# (Keyed by id, the weight held weakly: tensors compare elementwise, so they cannot be dict keys.)
_KNOWN_HEADS: dict[int, tuple[weakref.ref, tuple, tuple]] = {}


def _known_head(weight: Tensor, stamp: tuple) -> tuple | None:
    entry = _KNOWN_HEADS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != stamp:
        return None
    key, vectors, version = entry[2]
    return (key, vectors) if vectors._version == version else None  # the vectors handed out unchanged


def _remember_head(weight: Tensor, stamp: tuple, key: str, vectors: Tensor) -> None:
    ident = id(weight)
    ref = weakref.ref(weight, lambda _: _KNOWN_HEADS.pop(ident, None))
    _KNOWN_HEADS[ident] = (ref, stamp, (key, vectors, vectors._version))


def semantic_bases(lm_head_weight: Tensor, *, rcond: float | None = None) -> Tensor:
    """(V, d) semantic bases of an LM head ``lm_head_weight`` (V, d).

    Equals ``torch.linalg.pinv(L.double(), rcond=rcond).T`` in L's dtype: row i is the latent
    vector whose logits ``L @ s_i`` are the least-squares best approximation of the one-hot e_i.
    ``rcond`` (relative to the largest singular value) zeroes small singular values of
    rank-deficient heads; None keeps torch's default, ``max(V, d) * eps(float64)``.
    """
    check_float(lm_head_weight, "lm_head_weight")
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must have shape (V, d), got {tuple(lm_head_weight.shape)}")
    if lm_head_weight.shape[0] == 0 or lm_head_weight.shape[1] == 0:
        raise ValueError(f"lm_head_weight is empty: shape {tuple(lm_head_weight.shape)}")
    if rcond is not None:
        rcond = check_number(rcond, "rcond", low=0.0)
    check_finite(lm_head_weight, "lm_head_weight")
    weight = lm_head_weight.detach().double()
    pinv = torch.linalg.pinv(weight) if rcond is None else torch.linalg.pinv(weight, rcond=rcond)
    return pinv.T.contiguous().to(lm_head_weight.dtype)


def lm_head_weight(model) -> Tensor:
    """The (V, d) unembedding matrix of a Hugging Face causal LM, tied or not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    return head.weight


class SemanticBasis:
    """The semantic bases of one model's vocabulary, with helpers to look up words.

    ``vectors`` is (V, d). ``token_ids(words)`` maps label words to vocabulary ids (the token of
    ``" word"``; its last token when it splits) and ``for_words(words)`` returns their bases.
    """

    def __init__(self, vectors: Tensor, *, tokenizer=None, head_sha256: str | None = None,
                 model_name: str | None = None):
        self.vectors = vectors
        self.tokenizer = tokenizer
        self.head_sha256 = head_sha256
        self.model_name = model_name  # where a missing tokenizer is loaded from

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __repr__(self) -> str:
        v, d = self.vectors.shape
        return f"SemanticBasis(V={v}, d={d}, dtype={self.vectors.dtype})"

    @classmethod
    def from_model(cls, model, *, cache_dir: str | os.PathLike | None = None, tokenizer=None,
                   rcond: float | None = None) -> SemanticBasis:
        """Bases of a Hugging Face causal LM's head (tied or untied; a bias is ignored).

        Cached in ``cache_dir`` (default ``default_cache_dir() / "bases"``) under a hash of the
        head's weights, shape, dtype and ``rcond``; a cache file that is corrupt, truncated or
        belongs to other weights is detected and rebuilt. ``tokenizer`` serves ``token_ids``;
        without one it is loaded from ``model.name_or_path`` when first needed.
        """
        weight = lm_head_weight(model)
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "bases"
        stamp = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape), rcond, str(directory))
        known = _known_head(weight, stamp)
        if known is not None:
            key, vectors = known
        else:
            # the key covers the head's dtype and shape too, so a matching entry has the right ones
            key = content_key({"entry": _CACHE_FORMAT, "rcond": rcond}, weight)
            path = directory / f"bases-{key[:32]}.safetensors"
            cached = load_tensors(path, key, names=["vectors"])
            if cached is not None:
                vectors = cached["vectors"]
            else:
                vectors = semantic_bases(weight.detach().cpu(), rcond=rcond)
                save_tensors(path, key, {"vectors": vectors})
            _remember_head(weight, stamp, key, vectors)
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        return cls(vectors, tokenizer=tokenizer, head_sha256=key, model_name=name)

    def _tokenizer(self):
        if self.tokenizer is None:
            if not self.model_name:
                raise ValueError("this SemanticBasis has no tokenizer: pass tokenizer= to from_model")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        return self.tokenizer

    def token_ids(self, words: Sequence[str], *, prefix_space: bool = True, which: str = "last") -> Tensor:
        """Vocabulary id of each word: a token of ``" " + word`` (see ``word_token_ids``; the
        last token of a word that splits, whose basis stands for the word; ``which="first"`` gives
        the token an LM emits first, what next-token scoring compares)."""
        return word_token_ids(self._tokenizer(), words, prefix_space=prefix_space, which=which, vocab=len(self))

    def for_words(self, words: Sequence[str], *, prefix_space: bool = True, which: str = "last") -> Tensor:
        """(len(words), d) bases of the words' tokens."""
        return self.vectors[self.token_ids(words, prefix_space=prefix_space, which=which)]

    def to(self, *args, **kwargs) -> SemanticBasis:
        return SemanticBasis(self.vectors.to(*args, **kwargs), tokenizer=self.tokenizer,
                             head_sha256=self.head_sha256, model_name=self.model_name)


WHICH_TOKEN = ("last", "first")


def word_token_ids(tokenizer, words: Sequence[str], *, prefix_space: bool = True, which: str = "last",
                   vocab: int | None = None) -> Tensor:
    """One vocabulary id per word: a token of ``" " + word`` (``prefix_space=False``: the word as
    given). A word that splits into several tokens is represented by its ``which`` token: "last"
    (the label basis of vocabulary-defined semantics) or "first" (the token a model must emit
    next to start the word, what next-token scoring compares)."""
    if isinstance(words, str):
        raise TypeError("words must be a sequence of strings, not one string")
    if which not in WHICH_TOKEN:
        raise ValueError(f"which must be one of {WHICH_TOKEN}, got {which!r}")
    ids = []
    for word in words:
        if not isinstance(word, str) or not word:
            raise ValueError(f"words must be non-empty strings, got {word!r}")
        text = " " + word if prefix_space and not word[0].isspace() else word
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ValueError(f"word {word!r} encodes to no token")
        token = encoded[-1] if which == "last" else encoded[0]
        if vocab is not None and token >= vocab:
            raise ValueError(f"word {word!r} maps to token {token}, outside the head's V={vocab}")
        ids.append(token)
    return torch.tensor(ids, dtype=torch.long)
