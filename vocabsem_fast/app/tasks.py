"""One classification task on one frozen LM: the seeded train/test subsets, their prompts and
labels, the label words' tokens, and the prompts' representations, computed once and shared by
every method that needs them (each method is still charged the time they took)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bases import SemanticBasis, word_token_ids
from .data import ClassificationData, Example, per_class_subset, skewed_subset
from .representations import Representations, extract

TRAIN_SAMPLINGS = ("stratified", "per_class", "skewed")


def first_token_ids(tokenizer, words: list[str]) -> Tensor:
    """The first token of ``" " + word`` for each word: the token an LM must emit next to start
    that word after a prompt (what next-token scoring compares), distinct for every word."""
    ids = word_token_ids(tokenizer, words, which="first")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"label words {words} share a first token: next-token scoring cannot tell them apart")
    return ids


def head_logits(model, last: Tensor, token_ids: Tensor | None = None) -> Tensor:
    """Next-token logits (of ``token_ids`` only, if given) from last-layer states taken after
    the final norm: the LM head alone, no forward pass."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if token_ids is not None:
        weight, bias = weight[token_ids], None if bias is None else bias[token_ids]
    with torch.no_grad():
        return F.linear(last.to(weight.device, weight.dtype), weight, bias).float().cpu()


@dataclass
class Task:
    """A data set's seeded subsets on one model. ``train_limit`` / ``test_limit`` take
    class-stratified subsets; a data set whose test split carries no usable labels is evaluated
    on a stratified hold-out of its training split instead (``holdout`` says so)."""

    model: object
    tokenizer: object
    data: ClassificationData
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    # how the training subset is drawn: "stratified" (train_limit in the split's proportions),
    # "per_class" (train_limit examples of every class), "skewed" (at most train_limit, one class
    # four times each other; data.skewed_subset)
    train_sampling: str = "stratified"
    batch_size: int = 16
    use_cache: bool = True
    progress: bool = True
    extraction_seconds: dict[str, float] = field(default_factory=dict)  # by representation_key
    _reps: dict[str, Representations] = field(default_factory=dict, repr=False)
    _copies: dict[torch.dtype, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.holdout = not self.data.test_labelled
        self.labelled = self.data.with_labelled_test(self.seed)
        self.train: list[Example] = self._training_subset()
        self.test: list[Example] = self.labelled.subset("test", self.test_limit, self.seed)

    def _training_subset(self) -> list[Example]:
        if self.train_sampling == "stratified":
            return self.labelled.subset("train", self.train_limit, self.seed)
        if self.train_sampling not in TRAIN_SAMPLINGS:
            raise ValueError(f"train_sampling must be one of {TRAIN_SAMPLINGS}, got {self.train_sampling!r}")
        if self.train_limit is None:
            raise ValueError(f"train_sampling={self.train_sampling!r} needs a train_limit")
        if self.train_sampling == "per_class":
            return per_class_subset(self.labelled.train, self.train_limit, self.seed)
        return skewed_subset(self.labelled.train, self.train_limit, self.seed)

    @property
    def words(self) -> list[str]:
        return self.data.words

    @property
    def num_classes(self) -> int:
        return len(self.data.labels)

    def prompts(self, split: str) -> list[str]:
        return [self.data.prompt(e) for e in getattr(self, split)]

    def labels(self, split: str) -> Tensor:
        return torch.tensor([self.data.label_index(e) for e in getattr(self, split)], dtype=torch.long)

    def demonstration(self, example: Example) -> str:
        """An example with its answer, as it appears among in-context demonstrations."""
        return f"{self.data.prompt(example)} {self.data.label_words[example.label]}"

    @cached_property
    def next_token_ids(self) -> Tensor:
        return first_token_ids(self.tokenizer, self.words)

    @cached_property
    def basis(self) -> SemanticBasis:
        return SemanticBasis.from_model(self.model, tokenizer=self.tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights as loaded."""
        return next(self.model.parameters()).dtype

    def model_in(self, dtype: torch.dtype | None = None):
        """The model with its weights in ``dtype`` (None: as loaded): a copy, made once per task,
        for a method that extracts its representations at another precision."""
        if dtype is None or dtype == self.dtype:
            return self.model
        if dtype not in self._copies:
            self._copies[dtype] = copy.deepcopy(self.model).to(dtype)
        return self._copies[dtype]

    def representation_key(self, split: str, dtype: torch.dtype | None = None) -> str:
        """``split``, or ``split@dtype`` for representations extracted at another precision than
        the model's: the key of ``extraction_seconds``."""
        if dtype is None or dtype == self.dtype:
            return split
        return f"{split}@{str(dtype).removeprefix('torch.')}"

    def encode(self, prompts: list[str], *, desc: str = "representations",
               dtype: torch.dtype | None = None) -> Representations:
        return extract(self.model_in(dtype), self.tokenizer, prompts, batch_size=self.batch_size,
                       use_cache=self.use_cache, progress=self.progress, desc=desc)

    def representations(self, split: str, dtype: torch.dtype | None = None) -> Representations:
        """The zero-shot prompts' representations of ``split`` (from the model's weights in
        ``dtype``, None: as loaded), computed once per task and returned in float32."""
        key = self.representation_key(split, dtype)
        if key not in self._reps:
            start = time.perf_counter()
            self._reps[key] = self.encode(self.prompts(split), desc=f"{self.data.name} {key}", dtype=dtype)
            self.extraction_seconds[key] = time.perf_counter() - start
        return self._reps[key]

    def represent(self, prompts: list[str], *, dtype: torch.dtype | None = None) -> Representations:
        """Representations of ``prompts``: a split's shared ones when they are that split's
        prompts (computed once, timed in ``extraction_seconds``), else computed for the caller."""
        for split in ("train", "test"):
            if prompts == self.prompts(split):
                return self.representations(split, dtype)
        return self.encode(prompts, dtype=dtype)
