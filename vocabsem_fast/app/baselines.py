"""The methods vocabulary-defined semantics is compared against, on the same frozen LM, subsets
and seed:

- ``InContextLearning`` ("icl"): k random demonstrations in the context; the answer is the label
  word whose first token has the highest next-token logit.
- ``RetrievalICL`` ("rag"): the same, with the k training examples nearest to the query by the
  LM's own representation as demonstrations (most similar next to the query).
- ``KNNPrompting`` ("knn", Xu et al., ICLR 2023): a datastore of the next-token distributions of
  the training prompts; a query takes the majority label of its k nearest anchors by
  KL(anchor || query) over the whole vocabulary.
- ``AdapterTuning`` ("lora", "ia3"): a ``peft`` adapter on a copy of the LM, trained with
  cross-entropy so that the zero-shot prompt is followed by its label word's first token.

Each has ``fit(task)`` and ``predict(task)`` (label indices of ``task.test``).
"""

from __future__ import annotations

import copy
import random
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .representations import batch_inputs, context_limit
from .tasks import Task, head_logits

DEMO_SEPARATOR = "\n\n"


def build_context(tokenizer, demonstrations: list[str], query: str, max_tokens: int) -> str:
    """Demonstrations (farthest from the query first) and the query, joined by blank lines;
    demonstrations are dropped from the front until the whole fits in ``max_tokens``. A query
    longer than that on its own keeps its last ``max_tokens`` tokens (the part that asks)."""
    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    demos = list(demonstrations)
    while demos and length(DEMO_SEPARATOR.join(demos + [query])) > max_tokens:
        demos.pop(0)
    if demos:
        return DEMO_SEPARATOR.join(demos + [query])
    full = length(query)
    if full > max_tokens:
        ids = tokenizer(query, add_special_tokens=False)["input_ids"]
        specials = full - len(ids)
        query = tokenizer.decode(ids[len(ids) - max(1, max_tokens - specials):])
    return query


def _label_scores(task: Task, last: Tensor) -> Tensor:
    return head_logits(task.model, last, task.next_token_ids)


class InContextLearning:
    name = "icl"
    uses_representations: tuple[str, ...] = ()

    def __init__(self, shots: int = 4, *, max_context_tokens: int = 1024):
        if shots < 0:
            raise ValueError(f"shots must be >= 0, got {shots}")
        self.shots = shots
        self.max_context_tokens = max_context_tokens

    def fit(self, task: Task) -> InContextLearning:
        rng = random.Random(task.seed)
        self.demonstrations = rng.sample(task.train, min(self.shots, len(task.train)))
        return self

    def _demonstrations_for(self, task: Task) -> list[list]:
        return [self.demonstrations] * len(task.test)

    def predict(self, task: Task) -> Tensor:
        limit = context_limit(task.model, self.max_context_tokens)
        prompts = [build_context(task.tokenizer, [task.demonstration(d) for d in demos], task.data.prompt(query), limit)
                   for demos, query in zip(self._demonstrations_for(task), task.test)]
        reps = task.encode(prompts, desc=f"{task.data.name} {self.name}")
        return _label_scores(task, reps.last).argmax(-1)


class RetrievalICL(InContextLearning):
    name = "rag"
    uses_representations = ("train", "test")

    def fit(self, task: Task) -> RetrievalICL:
        self.keys = F.normalize(task.representations("train").last, dim=-1)
        return self

    def _demonstrations_for(self, task: Task) -> list[list]:
        queries = F.normalize(task.representations("test").last, dim=-1)
        k = min(self.shots, len(task.train))
        if k == 0:
            return [[] for _ in task.test]
        nearest = (queries @ self.keys.T).topk(k, dim=-1).indices.flip(-1)  # most similar last
        return [[task.train[i] for i in row] for row in nearest.tolist()]


class KNNPrompting:
    """``shots`` > 0 puts that many random demonstrations before every anchor and query prompt
    (Xu et al.'s in-context part); the default 0 reads the distributions off the zero-shot
    representations, which the other methods share, so the datastore costs no extra forward pass."""

    name = "knn"

    def __init__(self, k: int = 5, *, shots: int = 0, max_context_tokens: int = 1024, chunk: int = 256):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.shots, self.max_context_tokens, self.chunk = k, shots, max_context_tokens, chunk

    @property
    def uses_representations(self) -> tuple[str, ...]:
        return ("train", "test") if self.shots == 0 else ()

    def _states(self, task: Task, examples: list, split: str) -> Tensor:
        if self.shots == 0:
            return task.representations(split).last
        limit = context_limit(task.model, self.max_context_tokens)
        demos = [task.demonstration(d) for d in self.demonstrations]
        prompts = [build_context(task.tokenizer, demos, task.data.prompt(e), limit) for e in examples]
        return task.encode(prompts, desc=f"{task.data.name} knn {split}").last

    def fit(self, task: Task) -> KNNPrompting:
        rng = random.Random(task.seed)
        self.demonstrations = rng.sample(task.train, min(self.shots, len(task.train)))
        chosen = {id(e) for e in self.demonstrations}
        anchors = [e for e in task.train if id(e) not in chosen] or task.train
        self.anchor_states = self._states(task, anchors, "train")
        self.anchor_labels = torch.tensor([task.data.label_index(e) for e in anchors])
        return self

    def distances(self, task: Task, query_states: Tensor) -> Tensor:
        """(Q, A) KL(anchor || query) of the next-token distributions, in chunks of rows."""
        rows = []
        for q in query_states.split(self.chunk):
            log_q = F.log_softmax(head_logits(task.model, q), dim=-1)
            cols = []
            for a in self.anchor_states.split(self.chunk):
                log_a = F.log_softmax(head_logits(task.model, a), dim=-1)
                p_a = log_a.exp()
                cols.append((p_a * log_a).sum(-1)[None, :] - log_q @ p_a.T)
            rows.append(torch.cat(cols, 1))
        return torch.cat(rows) if rows else query_states.new_empty(0, len(self.anchor_labels))

    def predict(self, task: Task) -> Tensor:
        dist = self.distances(task, self._states(task, task.test, "test"))
        nearest = dist.topk(min(self.k, dist.shape[1]), dim=-1, largest=False).indices
        return majority_vote(self.anchor_labels[nearest], task.num_classes)


def majority_vote(neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """The most frequent label of each row of (Q, k) neighbour labels, nearest first; ties go to
    the class of the nearest neighbour (it adds half a vote)."""
    votes = F.one_hot(neighbour_labels, num_classes).sum(1).float()
    if neighbour_labels.shape[1]:
        votes += 0.5 * F.one_hot(neighbour_labels[:, 0], num_classes)
    return votes.argmax(-1)


ADAPTERS = ("lora", "ia3")


class AdapterTuning:
    """Parameter-efficient fine-tuning with ``peft`` ("lora" or "ia3", peft's default target
    modules for the architecture) on a copy of the LM: the task's LM is left untouched."""

    uses_representations: tuple[str, ...] = ()

    def __init__(self, kind: str = "lora", *, epochs: int = 2, lr: float | None = None, batch_size: int = 8,
                 rank: int = 8, max_prompt_tokens: int = 512):
        if kind not in ADAPTERS:
            raise ValueError(f"kind must be one of {ADAPTERS}, got {kind!r}")
        self.name = kind
        self.epochs, self.batch_size, self.rank, self.max_prompt_tokens = epochs, batch_size, rank, max_prompt_tokens
        # IA3 rescales activations (vectors initialised at one) and wants a larger step than LoRA
        self.lr = lr if lr is not None else (1e-3 if kind == "lora" else 1e-2)

    def _adapted(self, model):
        try:
            import peft
        except ImportError:
            raise RuntimeError(f"the {self.name} baseline needs peft: pip install peft") from None
        if self.name == "lora":
            config = peft.LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0, task_type="CAUSAL_LM")
        else:
            config = peft.IA3Config(task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(self.seed)  # LoRA's random init, seeded, global RNG untouched
            # peft asks transformers about gradient checkpointing by a name it has deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(copy.deepcopy(model), config)

    def _last_logits(self, task: Task, prompts: list[str]) -> Tensor:
        ids, mask, positions = batch_inputs(task.tokenizer, prompts, self.device, max_length=self.max_prompt_tokens)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    def fit(self, task: Task) -> AdapterTuning:
        self.seed = task.seed
        self.model = self._adapted(task.model)
        self.device = next(self.model.parameters()).device
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        prompts, targets = task.prompts("train"), task.next_token_ids[task.labels("train")]
        generator = torch.Generator().manual_seed(task.seed)
        steps = self.epochs * -(-len(prompts) // self.batch_size)
        bar = _progress(task, steps, f"{task.data.name} {self.name} training")
        self.model.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(prompts), generator=generator).split(self.batch_size):
                logits = self._last_logits(task, [prompts[i] for i in idx])
                loss = F.cross_entropy(logits, targets[idx].to(logits.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update(1)
        bar.close()
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, task: Task) -> Tensor:
        prompts = task.prompts("test")
        out = []
        for start in range(0, len(prompts), task.batch_size):
            logits = self._last_logits(task, prompts[start:start + task.batch_size])
            out.append(logits[:, task.next_token_ids.to(logits.device)].argmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _progress(task: Task, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not task.progress)
