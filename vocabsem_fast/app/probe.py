"""A linear probe: logistic regression on a frozen model's features, what a practitioner fits
first for a cheap classifier. scikit-learn fits it (its inverse regularisation strength C chosen
by stratified cross-validation on the training rows); prediction runs in torch on the fitted
weights, so a saved probe is a few tensors, not a pickled estimator, and predicts identically
before and after a round trip."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy
import torch
from torch import Tensor

SCORING = ("accuracy", "balanced_accuracy", "f1_macro")
CLASS_WEIGHT = ("none", "balanced")


@dataclass
class ProbeConfig:
    folds: int = 4  # cross-validation folds for C (fewer where a class has fewer examples)
    cs: int = 12  # candidate values of C, log-spaced over [1e-4, 1e2]
    max_iter: int = 2000
    scoring: str = "accuracy"  # what cross-validation maximises
    class_weight: str = "none"  # "balanced": each class weighs as much in the loss, whatever its count
    seed: int = 0

    def __post_init__(self):
        for name in ("folds", "cs", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, allowed in (("scoring", SCORING), ("class_weight", CLASS_WEIGHT)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


class LinearProbe:
    """Standardised features -> logistic regression over ``num_classes`` classes. A class with
    no training example gets probability 0."""

    def __init__(self, num_classes: int, config: ProbeConfig | None = None):
        self.num_classes = num_classes
        self.config = config or ProbeConfig()
        self.shift = self.spread = self.weight = self.bias = None  # tensors, set by fit or load
        self.chosen_c: float | None = None
        self.validation_score: float | None = None
        self.estimator = None  # the fitted scikit-learn estimator (not saved: its weights are)

    def fit(self, features: Tensor, labels: Tensor) -> LinearProbe:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold

        cfg = self.config
        x = features.double()
        self.shift = x.mean(0)
        self.spread = x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.shift)
        z = ((x - self.shift) / self.spread).numpy()
        y = labels.long().numpy()
        present = sorted(set(y.tolist()))
        weight = None if cfg.class_weight == "none" else cfg.class_weight
        smallest = min((y == c).sum() for c in present)
        folds = min(cfg.folds, int(smallest))
        with warnings.catch_warnings():
            # lbfgs stopping at max_iter on separable rows still gives a usable (large-C) solution
            warnings.simplefilter("ignore", ConvergenceWarning)
            if len(present) < 2:
                fitted = None
            elif folds >= 2:
                search = LogisticRegressionCV(
                    Cs=list(torch.logspace(-4, 2, cfg.cs, dtype=torch.float64).tolist()),
                    cv=StratifiedKFold(folds, shuffle=True, random_state=cfg.seed), scoring=cfg.scoring,
                    class_weight=weight, max_iter=cfg.max_iter, random_state=cfg.seed, **_current_api())
                fitted = search.fit(z, y)
                self.chosen_c = float(numpy.atleast_1d(search.C_)[0])
                # the mean cross-validated score of the chosen C (scores_: a dict by class in
                # older scikit-learn, an array (folds, ...) in newer)
                scores = search.scores_
                scores = next(iter(scores.values())) if isinstance(scores, dict) else scores
                self.validation_score = float(numpy.asarray(scores).mean(0).max())
            else:  # a class with one example: no cross-validation, sklearn's default C
                fitted = LogisticRegression(C=1.0, class_weight=weight, max_iter=cfg.max_iter).fit(z, y)
                self.chosen_c = 1.0
        self.estimator = fitted
        d = z.shape[1]
        # rows of absent classes stay at -inf: probability 0
        self.weight = torch.zeros(self.num_classes, d, dtype=torch.float32)
        self.bias = torch.full((self.num_classes,), float("-inf"))
        if fitted is None:  # one class only: it always wins
            self.bias[present[0]] = 0.0
        else:
            coef = torch.from_numpy(fitted.coef_).float()
            intercept = torch.from_numpy(fitted.intercept_).float()
            if len(present) == 2:  # sklearn keeps one row, the log-odds of the second class
                coef = torch.stack([torch.zeros_like(coef[0]), coef[0]])
                intercept = torch.stack([torch.zeros_like(intercept[0]), intercept[0]])
            rows = torch.tensor([int(c) for c in fitted.classes_])
            self.weight[rows] = coef
            self.bias[rows] = intercept
        self.shift, self.spread = self.shift.float(), self.spread.float()
        return self

    @torch.no_grad()
    def probabilities(self, features: Tensor) -> Tensor:
        if self.weight is None:
            raise RuntimeError("fit() first")
        z = (features.float() - self.shift) / self.spread
        return (z @ self.weight.T + self.bias).softmax(-1)

    def tensors(self) -> dict[str, Tensor]:
        return {"shift": self.shift, "spread": self.spread, "weight": self.weight, "bias": self.bias}

    def load_tensors(self, tensors: dict[str, Tensor]) -> LinearProbe:
        self.shift, self.spread, self.weight, self.bias = (tensors[k].float() for k in ("shift", "spread", "weight",
                                                                                         "bias"))
        return self

    @property
    def trainable_parameters(self) -> int:
        return 0 if self.weight is None else self.weight.numel() + self.bias.numel()


def _current_api() -> dict:
    """scikit-learn >= 1.8 asks for these to be set (their defaults change); older ones lack them."""
    import inspect

    from sklearn.linear_model import LogisticRegressionCV

    accepted = inspect.signature(LogisticRegressionCV).parameters
    wanted = {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    return {k: v for k, v in wanted.items() if k in accepted}
