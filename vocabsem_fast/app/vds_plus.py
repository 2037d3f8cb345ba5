"""``vds+``: vocabulary-defined semantics that starts from the model's own zero-shot answer.

The paper's module starts from a random map, so a few hundred examples must rebuild what an
instruction-tuned model already knows about its label words (untrained, the cosine to the label
bases is at chance). ``vds+`` scores class c of an example as

    z_c = a * log p_zeroshot(c) + scale * cos(module(r), basis_c)

where ``p_zeroshot`` is the LM head's next-token distribution over the label words (first tokens)
at the prompt's last position, renormalised over the classes, ``basis_c`` is the semantic basis
of label word c (its last token, as in ``vds``) and ``module`` maps the frozen representation
``r`` into the latent space of the bases. By default (``read="layers"``) the module reads more
than the last layer: the last-token state of the last layer and the last-token state and token
mean of an inner layer (three quarters of the depth, where linear probes of the default model
peak), each standardised with the training rows' statistics, through an MLP and a LayerNorm
(``LayeredClustering``); ``read="last"`` uses the paper's semantic clustering module on the last
layer. The module is trained either with cross-entropy over the classes (the prior inside the
logits) or, as the paper trains it, with the similarity cross-entropy over the whole
vocabulary (the prior then added when predicting).

What the evidence decides, by cross-validation on the training data (``folds``, never the test
split; ``folds=1``: one held-out split): which training, whether the prior enters (``a`` in
{0, 1}), the scale, and the number of epochs, checked after every epoch (a candidate stops after
``patience`` epochs without a gain); and whether training helps at all (the zero-shot answer
alone is a candidate, so ``vds+`` does not lose to the model it adapts unless validation misleads
it). The winner predicts as the average of its folds' modules at the chosen epoch (``ensemble``),
or refitted on the whole training split for that many epochs.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import similarity_logits
from .models import native_bfloat16
from .representations import Representations
from .semantic_clustering import ATTENTION, SemanticClustering

READ = ("layers", "last")


@dataclass
class PlusConfig:
    epochs: int = 40  # the most epochs a candidate trains (the best one is chosen by validation)
    patience: int = 10  # a candidate stops after this many epochs without a validation gain
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    scales: tuple[float, ...] = (10.0,)
    priors: tuple[float, ...] = (0.0, 1.0)
    folds: int = 4  # cross-validation folds for the choices; 1: one held-out split of `validation`
    validation: float = 0.25  # fraction held out when folds == 1
    ensemble: bool = True  # predict with the folds' modules at the chosen epoch, not one refitted on every row
    vocabulary: bool = True  # also try the paper's training over every basis (needs the bases)
    read: str = "layers"  # "layers": last and inner layer (LayeredClustering); "last": the paper's module
    attention: str = "pooled"  # the paper's module's channel attention (read="last" only)
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("attention", ATTENTION), ("read", READ)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "patience", "batch_size", "folds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("ensemble", "vocabulary"):
            value = getattr(self, name)
            if value not in (0, 1) or isinstance(value, float):  # True / False, or 1 / 0 from a spec
                raise ValueError(f"{name} must be true or false (1 or 0), got {value!r}")
            setattr(self, name, bool(value))
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


class LayeredClustering(nn.Module):
    """``vds+``'s module: features from more than one layer (concatenated, ``inputs`` vectors of
    size d), standardised with the statistics of the rows it trains on, mapped ``inputs*d -> 2d ->
    d`` and layer-normed into the latent space of the semantic bases. Channels differ in scale by
    orders of magnitude (inner layers carry a few huge ones), hence the standardisation."""

    def __init__(self, d: int, inputs: int, *, expansion: int = 2):
        super().__init__()
        self.register_buffer("shift", torch.zeros(inputs * d))
        self.register_buffer("spread", torch.ones(inputs * d))
        self.mlp = nn.Sequential(nn.Linear(inputs * d, expansion * d), nn.GELU(), nn.Linear(expansion * d, d))
        self.norm = nn.LayerNorm(d)

    @torch.no_grad()
    def standardise_with(self, features: Tensor) -> LayeredClustering:
        self.shift.copy_(features.mean(0))
        self.spread.copy_(features.std(0, unbiased=False).clamp_min(1e-6) if len(features) > 1
                          else torch.ones_like(self.spread))
        return self

    def forward(self, features: Tensor) -> Tensor:
        return self.norm(self.mlp((features - self.shift) / self.spread))


def layered_features(reps: Representations) -> Tensor:
    """(M, 3d): the last layer's last-token state, the inner layer's last-token state and mean."""
    if reps.inner_last is None or reps.inner_mean is None:
        raise ValueError("vds+ with read='layers' needs the inner layer's states (Representations.inner_last and "
                         "inner_mean, filled by app.representations.extract); pass read='last' to use the last "
                         "layer alone")
    return torch.cat([reps.last, reps.inner_last, reps.inner_mean], dim=-1).float()


def _stratified_folds(labels: Tensor, folds: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``folds`` (fit, held-out) index pairs whose held-out parts partition the rows, each class
    dealt round the folds in turn (continuing where the previous class stopped, so the folds
    differ in size by at most one row)."""
    rng = random.Random(seed)
    held: list[list[int]] = [[] for _ in range(folds)]
    turn = 0
    for c in sorted(set(labels.tolist())):
        members = [i for i, y in enumerate(labels.tolist()) if y == c]
        rng.shuffle(members)
        for i in members:
            held[turn % folds].append(i)
            turn += 1
    every = set(range(len(labels)))
    return [(torch.tensor(sorted(every - set(h))), torch.tensor(sorted(h))) for h in held]


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
        # the vocabulary training's bases, unit length, in bfloat16 where the device multiplies it
        # natively: a step scores a few hundred rows, whose (rows, V) logits are small enough to
        # hold, and one low-precision GEMM then beats streaming the float32 bases through the
        # fused kernel (which exists for the (tokens, V) problems that do not fit in memory)
        self._unit_bases = None
        if self.bases is not None:
            fast = torch.bfloat16 if native_bfloat16(self.bases.device) else torch.float32
            self._unit_bases = F.normalize(self.bases, dim=-1).to(fast)
        self.label_token_ids = None if label_token_ids is None else label_token_ids.long()
        self.choice: Choice | None = None
        self.module: nn.ModuleList | None = None  # the modules whose probabilities predict() averages

    def _inputs(self, reps: Representations) -> tuple[Tensor, ...]:
        """What the module reads of every row: one feature matrix, or the paper's three views."""
        if self.config.read == "layers":
            return (layered_features(reps),)
        return reps.last.float(), reps.mean.float(), reps.max.float()

    def _new_module(self, inputs: tuple[Tensor, ...], rows: Tensor, seed: int) -> nn.Module:
        d = self.label_bases.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.config.read == "layers":
                return LayeredClustering(d, inputs[0].shape[1] // d).standardise_with(inputs[0][rows])
            return SemanticClustering(d, attention=self.config.attention)

    def _logits(self, module, inputs, idx, prior: Tensor, a: float, scale: float) -> Tensor:
        out = module(*(x[idx] for x in inputs))
        return a * prior[idx] + similarity_logits(out, self.label_bases, scale=scale)

    def _loss(self, modules, inputs, batches: list[Tensor], prior: Tensor, labels: Tensor, training: str, a: float,
              scale: float) -> Tensor:
        """The sum over modules of each one's mean loss on its own batch: every module gets the
        gradient it would get alone. The vocabulary training scores all the batches in one GEMM,
        so the V x d bases are streamed once per step, not once per module."""
        if training == "vocabulary":
            out = torch.cat([m(*(x[b] for x in inputs)) for m, b in zip(modules, batches)])
            targets = self.label_token_ids[labels[torch.cat(batches)]]
            unit = F.normalize(out, dim=-1).to(self._unit_bases.dtype)
            logits = scale * (unit @ self._unit_bases.T).float()
            per_row = F.cross_entropy(logits, targets, reduction="none")
            weights = torch.cat([torch.full((len(b),), 1.0 / len(b)) for b in batches])
            return (per_row * weights).sum()
        return sum(F.cross_entropy(self._logits(m, inputs, b, prior, a, scale), labels[b])
                   for m, b in zip(modules, batches))

    def _train(self, inputs, prior: Tensor, labels: Tensor, rows: list[Tensor], training: str, a: float,
               scale: float, epochs: int, seed: int, evaluate=None) -> tuple[list[nn.Module], list]:
        """One module per entry of ``rows`` (the rows it trains on), trained in lockstep for
        ``epochs`` epochs, or, given ``evaluate(modules)`` (a list of scores after each epoch),
        until no score has improved for ``patience`` epochs."""
        cfg = self.config
        modules = [self._new_module(inputs, idx, seed) for idx in rows]
        # fused: one kernel per step instead of a dozen per parameter (the optimiser step costs
        # as much as the forward and backward of this small module)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
                      for m in modules]
        generators = [torch.Generator().manual_seed(seed) for _ in rows]
        history, best, since = [], None, 0
        for _ in range(epochs):
            orders = [idx[torch.randperm(len(idx), generator=g)] for idx, g in zip(rows, generators)]
            for module in modules:
                module.train()
            for start in range(0, max(len(order) for order in orders), cfg.batch_size):
                # the modules whose rows are not used up yet step together
                stepping = [k for k, order in enumerate(orders) if start < len(order)]
                batches = [orders[k][start:start + cfg.batch_size] for k in stepping]
                loss = self._loss([modules[k] for k in stepping], inputs, batches, prior, labels, training, a, scale)
                for k in stepping:
                    optimizers[k].zero_grad()
                loss.backward()
                for k in stepping:
                    optimizers[k].step()
            if evaluate is not None:
                for module in modules:
                    module.eval()
                with torch.no_grad():
                    scores = evaluate(modules)
                history.append(scores)
                gained = best is None or any(x > b for x, b in zip(scores, best))
                best = scores if best is None else [max(x, b) for x, b in zip(scores, best)]
                since = 0 if gained else since + 1
                if since >= cfg.patience:
                    break
        for module in modules:
            module.eval()
        return modules, history

    def _splits(self, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        cfg = self.config
        if cfg.folds == 1:
            return [_stratified_split(labels, cfg.validation, cfg.seed)]
        if len(labels) < cfg.folds:
            raise ValueError(f"folds={cfg.folds} needs at least as many training examples, got {len(labels)}")
        return _stratified_folds(labels, cfg.folds, cfg.seed)

    def fit(self, reps: Representations, prior: Tensor, labels: Tensor, *, progress=None) -> VDSPlusClassifier:
        """``prior``: (N, classes) zero-shot log-probabilities of the training examples. Every
        choice is scored by the accuracy on the held-out rows of all splits together (with
        ``folds`` > 1 each row is held out once: a cross-validated accuracy)."""
        cfg = self.config
        labels = labels.long()
        inputs = self._inputs(reps)
        splits = self._splits(labels)
        prior = prior.float()
        held_rows = sum(len(held) for _, held in splits)

        def accuracy(modules, weight: float, scale: float) -> float:
            right = 0
            for module, (_, held) in zip(modules, splits):
                logits = prior[held] if module is None else self._logits(module, inputs, held, prior, weight, scale)
                right += int((logits.argmax(-1) == labels[held]).sum())
            return right / held_rows if held_rows else 0.0

        # the zero-shot answer alone; every other candidate must beat it on validation
        best = Choice("none", 1.0, 1.0, 0, accuracy([None] * len(splits), 1.0, 1.0))
        candidates = {"zeroshot": best.validation_accuracy}
        chosen_modules = None
        for training, a, scale in self._candidates():
            # one vocabulary-trained module serves both prior weights (the prior enters at prediction)
            weights = cfg.priors if training == "vocabulary" else (a,)
            top = [-1.0] * len(weights)
            snapshots: list = [None] * len(weights)  # the fold modules at each weight's earliest best epoch

            def evaluate(modules, weights=weights, scale=scale, top=top, snapshots=snapshots):
                scores = [accuracy(modules, w, scale) for w in weights]
                for k, score in enumerate(scores):
                    if score > top[k]:
                        top[k] = score
                        if cfg.ensemble:
                            snapshots[k] = [copy.deepcopy(m) for m in modules]
                return scores

            _, history = self._train(inputs, prior, labels, [fit for fit, _ in splits], training, a, scale,
                                     cfg.epochs, cfg.seed, evaluate=evaluate)
            for k, w in enumerate(weights):
                scores = [h[k] for h in history]
                epoch = max(range(len(scores)), key=lambda e: (scores[e], -e))  # the earliest best
                candidates[f"{training} prior={w:g} scale={scale:g}"] = scores[epoch]
                if scores[epoch] > best.validation_accuracy:
                    best = Choice(training, w, scale, epoch + 1, scores[epoch])
                    chosen_modules = snapshots[k]
            if progress is not None:
                progress.update()
        best.candidates = candidates
        self.choice = best
        if not best.epochs:
            self.module = None
        elif cfg.ensemble:
            self.module = nn.ModuleList(chosen_modules)
        else:
            every = torch.arange(len(labels))
            refitted, _ = self._train(inputs, prior, labels, [every], best.training, best.prior_weight, best.scale,
                                      best.epochs, cfg.seed)
            self.module = nn.ModuleList(refitted)
        return self

    def _candidates(self) -> list[tuple[str, float, float]]:
        cfg = self.config
        runs = [("classes", a, scale) for a in cfg.priors for scale in cfg.scales]
        if cfg.vocabulary and self.bases is not None:
            runs += [("vocabulary", cfg.priors[0], scale) for scale in cfg.scales]
        return runs

    @torch.no_grad()
    def probabilities(self, reps: Representations, prior: Tensor) -> Tensor:
        """(M, classes): the mean of the chosen modules' class probabilities, or the zero-shot
        answer's when validation chose it alone."""
        if self.choice is None:
            raise RuntimeError("fit() first")
        prior = prior.float()
        if not self.choice.epochs:
            return prior.softmax(-1)
        every, inputs = torch.arange(prior.shape[0]), self._inputs(reps)
        total = sum(self._logits(m, inputs, every, prior, self.choice.prior_weight, self.choice.scale).softmax(-1)
                    for m in self.module)
        return total / len(self.module)

    def predict(self, reps: Representations, prior: Tensor) -> Tensor:
        return self.probabilities(reps, prior).argmax(-1)

    def drop_vocabulary(self) -> None:
        """Free the (V, d) bases: they serve the vocabulary training only, never prediction."""
        self.bases = self._unit_bases = None

    @property
    def candidates_trained(self) -> int:
        return len(self._candidates())
