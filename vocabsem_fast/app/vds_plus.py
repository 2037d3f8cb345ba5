"""``vds+``: vocabulary-defined semantics that starts from the model's own zero-shot answer.

The paper's module starts from a random map, so a few hundred examples must rebuild what an
instruction-tuned model already knows about its label words (untrained, the cosine to the label
bases is at chance). ``vds+`` scores class c of an example as

    z_c = a * log p_zeroshot(c) + scale * cos(module(r), basis_c)

where ``p_zeroshot`` is the LM head's next-token distribution over the label words (first tokens)
at the prompt's last position, renormalised over the classes, ``basis_c`` is the semantic basis
of label word c (its last token, as in ``vds``) and ``module`` is the paper's semantic clustering
module on the frozen representation ``r``. The module is trained either with cross-entropy over
the classes (the prior inside the logits) or, as the paper trains it, with the fused similarity
cross-entropy over the whole vocabulary (the prior then added when predicting).

What the evidence decides, on a validation split carved from the training data (never the test
split): which training, whether the prior enters (``a`` in {0, 1}), the scale, and the number of
epochs, checked after every epoch; and whether training helps at all (the zero-shot answer alone
is a candidate, so ``vds+`` does not lose to the model it adapts unless validation misleads it).
The winner is refitted on the whole training split for the chosen number of epochs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import similarity_cross_entropy, similarity_logits
from .representations import Representations
from .semantic_clustering import ATTENTION, SemanticClustering


@dataclass
class PlusConfig:
    epochs: int = 40  # the most epochs a candidate trains (the best one is chosen by validation)
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    scales: tuple[float, ...] = (10.0, 20.0)
    priors: tuple[float, ...] = (0.0, 1.0)
    validation: float = 0.25  # fraction of the training split held out for the choices
    vocabulary: bool = True  # also try the paper's training over every basis (needs the bases)
    attention: str = "pooled"
    seed: int = 0

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.validation < 1:
            raise ValueError(f"validation must lie in (0, 1), got {self.validation!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


@dataclass
class Choice:
    """What validation picked: the training (``"classes"`` or ``"vocabulary"``), ``prior_weight``
    a, ``scale``, ``epochs`` (0: the zero-shot answer alone) and the validation accuracy of every
    candidate it compared."""

    training: str
    prior_weight: float
    scale: float
    epochs: int
    validation_accuracy: float
    candidates: dict = field(default_factory=dict)


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, held-out) indices, every class represented in both where it has two examples."""
    rng = random.Random(seed)
    fit, held = [], []
    for c in sorted(set(labels.tolist())):
        members = [i for i, y in enumerate(labels.tolist()) if y == c]
        rng.shuffle(members)
        take = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held += members[:take]
        fit += members[take:]
    return torch.tensor(sorted(fit)), torch.tensor(sorted(held))


class VDSPlusClassifier:
    """Fits ``vds+`` on frozen representations and the zero-shot log-probabilities of the classes."""

    def __init__(self, label_bases: Tensor, config: PlusConfig | None = None, *, bases: Tensor | None = None,
                 label_token_ids: Tensor | None = None):
        self.config = config or PlusConfig()
        self.label_bases = label_bases.float()
        # the vocabulary training: every basis, and each class's token among them
        self.bases = None if bases is None else bases.float()
        self.label_token_ids = None if label_token_ids is None else label_token_ids.long()
        self.choice: Choice | None = None
        self.module: SemanticClustering | None = None

    def _logits(self, module, reps: Representations, idx, prior: Tensor, a: float, scale: float) -> Tensor:
        out = module(reps.last[idx], reps.mean[idx], reps.max[idx])
        return a * prior[idx] + similarity_logits(out, self.label_bases, scale=scale)

    def _loss(self, module, reps: Representations, batch, prior: Tensor, labels: Tensor, training: str, a: float,
              scale: float) -> Tensor:
        if training == "vocabulary":
            out = module(reps.last[batch], reps.mean[batch], reps.max[batch])
            return similarity_cross_entropy(out, self.bases, self.label_token_ids[labels[batch]], scale=scale)
        return F.cross_entropy(self._logits(module, reps, batch, prior, a, scale), labels[batch])

    def _train(self, reps: Representations, prior: Tensor, labels: Tensor, idx: Tensor, training: str, a: float,
               scale: float, epochs: int, seed: int, evaluate=None):
        """A module trained ``epochs`` epochs on rows ``idx``; ``evaluate(module)`` after each."""
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = SemanticClustering(self.label_bases.shape[1], attention=cfg.attention)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        history = []
        for _ in range(epochs):
            module.train()
            order = idx[torch.randperm(len(idx), generator=generator)]
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                loss = self._loss(module, reps, batch, prior, labels, training, a, scale)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if evaluate is not None:
                module.eval()
                with torch.no_grad():
                    history.append(evaluate(module))
        module.eval()
        return module, history

    def fit(self, reps: Representations, prior: Tensor, labels: Tensor, *, progress=None) -> VDSPlusClassifier:
        """``prior``: (N, classes) zero-shot log-probabilities of the training examples."""
        cfg = self.config
        labels = labels.long()
        fit_idx, held_idx = _stratified_split(labels, cfg.validation, cfg.seed)
        prior = prior.float()

        def accuracy(logits: Tensor) -> float:
            return float((logits.argmax(-1) == labels[held_idx]).float().mean()) if len(held_idx) else 0.0

        # the zero-shot answer alone; every other candidate must beat it on validation
        best = Choice("none", 1.0, 1.0, 0, accuracy(prior[held_idx]))
        candidates = {"zeroshot": best.validation_accuracy}
        for training, a, scale in self._candidates():
            # one vocabulary-trained module serves both prior weights (the prior enters at prediction)
            weights = cfg.priors if training == "vocabulary" else (a,)
            _, history = self._train(
                reps, prior, labels, fit_idx, training, a, scale, cfg.epochs, cfg.seed,
                evaluate=lambda m, weights=weights, scale=scale: [
                    accuracy(self._logits(m, reps, held_idx, prior, w, scale)) for w in weights])
            for k, w in enumerate(weights):
                scores = [h[k] for h in history]
                epoch = max(range(len(scores)), key=lambda e: (scores[e], -e))  # the earliest best
                candidates[f"{training} prior={w:g} scale={scale:g}"] = scores[epoch]
                if scores[epoch] > best.validation_accuracy:
                    best = Choice(training, w, scale, epoch + 1, scores[epoch])
            if progress is not None:
                progress.update()
        best.candidates = candidates
        self.choice = best
        if best.epochs:
            every = torch.arange(len(labels))
            self.module, _ = self._train(reps, prior, labels, every, best.training, best.prior_weight, best.scale,
                                         best.epochs, cfg.seed)
        return self

    def _candidates(self) -> list[tuple[str, float, float]]:
        cfg = self.config
        runs = [("classes", a, scale) for a in cfg.priors for scale in cfg.scales]
        if cfg.vocabulary and self.bases is not None:
            runs += [("vocabulary", cfg.priors[0], scale) for scale in cfg.scales]
        return runs

    @torch.no_grad()
    def predict(self, reps: Representations, prior: Tensor) -> Tensor:
        if self.choice is None:
            raise RuntimeError("fit() first")
        prior = prior.float()
        if not self.choice.epochs:
            return prior.argmax(-1)
        every = torch.arange(prior.shape[0])
        return self._logits(self.module, reps, every, prior, self.choice.prior_weight, self.choice.scale).argmax(-1)

    @property
    def candidates_trained(self) -> int:
        return len(self._candidates())
