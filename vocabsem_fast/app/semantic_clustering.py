"""The semantic clustering module of vocabulary-defined semantics (Gu et al., arXiv 2401.16184):
a small network on a frozen LM's representations, trained so that each example lands near the
semantic basis of its label word; prediction is the nearest label basis.

    SemanticClustering(r) = LN(MLP(r * CA(r))),  CA(r) = sigmoid(Bn(avg) + Bn(max))

Bn is one bottleneck d -> d/16 -> d shared by both branches (CBAM-style channel attention, d^2/8
parameters) over the mean- and max-pooled last-layer states of the prompt; the MLP is
d -> 2d -> d (4 d^2), about 33/8 d^2 in all, the paper's count.

``attention`` selects the reading of CA: "pooled" (the above), "last" (both branches read the
last-token vector itself, CA = sigmoid(2 Bn(r))) or "none" (no channel attention: LN(MLP(r))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import similarity_cross_entropy, similarity_logits
from .representations import Representations

TRAIN_LOGITS = ("sm", "mm", "sm-gt")
ATTENTION = ("pooled", "last", "none")
PREDICT_LOGITS = ("sm", "mm")


class SemanticClustering(nn.Module):
    def __init__(self, d: int, *, reduction: int = 16, expansion: int = 2, attention: str = "pooled"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.attention = attention
        hidden = max(1, d // reduction)
        if attention != "none":
            self.bottleneck = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.mlp = nn.Sequential(nn.Linear(d, expansion * d), nn.GELU(), nn.Linear(expansion * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, last: Tensor, mean: Tensor | None = None, peak: Tensor | None = None) -> Tensor:
        """last, mean, peak: (..., d) last-token state and the mean / max over the prompt's tokens
        (both default to ``last``; only the "pooled" reading uses them)."""
        if self.attention == "none":
            return self.norm(self.mlp(last))
        if self.attention == "last":
            mean = peak = last
        mean = last if mean is None else mean
        peak = last if peak is None else peak
        weights = torch.sigmoid(self.bottleneck(mean) + self.bottleneck(peak))
        return self.norm(self.mlp(last * weights))


@dataclass
class FitConfig:
    scale: float = 20.0  # inverse temperature of the cosine logits
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    train_logits: str = "sm"  # "sm": similarity over all V; "mm": the LM head; "sm-gt": gt basis only
    predict_logits: str = "sm"
    attention: str = "pooled"  # reading of the channel attention, see SemanticClustering
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("train_logits", TRAIN_LOGITS), ("predict_logits", PREDICT_LOGITS),
                              ("attention", ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("scale", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


class VDSClassifier:
    """Fits a SemanticClustering module on frozen representations; predicts the label whose word
    basis (or head row, for "mm") scores highest."""

    def __init__(self, bases: Tensor, label_token_ids: Tensor, *, head_weight: Tensor | None = None,
                 head_bias: Tensor | None = None, config: FitConfig | None = None):
        self.config = config or FitConfig()
        if "mm" in (self.config.train_logits, self.config.predict_logits) and head_weight is None:
            raise ValueError("the 'mm' (LM-head) logits need head_weight")
        self.bases = bases.float()
        self.label_token_ids = label_token_ids.long()
        self.head_weight = None if head_weight is None else head_weight.detach().float()
        self.head_bias = None if head_bias is None else head_bias.detach().float()
        self.module = SemanticClustering(bases.shape[1], attention=self.config.attention)

    def _row_losses(self, out: Tensor, labels: Tensor) -> Tensor:
        """The training loss of each example (reduced by ``fit``)."""
        cfg = self.config
        targets = self.label_token_ids[labels]
        if cfg.train_logits == "sm":
            return similarity_cross_entropy(out, self.bases, targets, scale=cfg.scale, reduction="none")
        if cfg.train_logits == "sm-gt":  # pull toward the ground-truth basis only: 1/V of the cost
            return 1.0 - torch.nn.functional.cosine_similarity(out, self.bases[targets], dim=-1)
        logits = out @ self.head_weight.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    def fit(self, reps: Representations, labels: Tensor, *, distributed: bool = False, group=None,
            progress: str | None = None) -> VDSClassifier:
        """Train the module. ``distributed=True`` trains it data-parallel (DDP) over the ranks of
        ``group`` (the default process group when None): every rank passes the same data and
        takes its share of each batch; the result equals one process's up to floating-point
        summation order. ``progress``: a description for a progress bar over the epochs (on
        stderr, with the last batch's loss), None for none."""
        cfg = self.config
        world, rank = 1, 0
        if distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("fit(distributed=True) needs an initialised torch.distributed process group")
            world, rank = dist.get_world_size(group), dist.get_rank(group)
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG left as it was
            torch.manual_seed(cfg.seed)
            self.module = SemanticClustering(self.bases.shape[1], attention=cfg.attention)
        model = self.module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(self.module, process_group=group)
        optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        labels = labels.long()
        self.module.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc=progress, unit="epoch", leave=False, disable=progress is None,
                   mininterval=0)  # every epoch shown: epochs are few
        for _ in range(cfg.epochs):
            order = torch.randperm(len(labels), generator=generator)  # the same order on every rank
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                idx = batch[rank::world]
                out = model(reps.last[idx], reps.mean[idx], reps.max[idx])
                # sum / batch size, times the ranks that DDP averages over: the batch mean's gradient
                loss = self._row_losses(out, labels[idx]).sum() * (world / len(batch))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
        bar.close()
        self.module.eval()
        return self

    @torch.no_grad()
    def transform(self, reps: Representations) -> Tensor:
        return self.module(reps.last, reps.mean, reps.max)

    @torch.no_grad()
    def class_logits(self, reps: Representations) -> Tensor:
        """(M, classes) scores of the labels: ``scale`` times the cosine to each label word's
        basis (the training's temperature), or the head's logits of the label tokens ("mm")."""
        out = self.transform(reps)
        if self.config.predict_logits == "sm":
            return similarity_logits(out, self.bases[self.label_token_ids], scale=self.config.scale)
        logits = out @ self.head_weight[self.label_token_ids].T
        if self.head_bias is not None:
            logits = logits + self.head_bias[self.label_token_ids]
        return logits

    @torch.no_grad()
    def predict(self, reps: Representations) -> Tensor:
        """Index (into the label list) of each example's nearest label."""
        return self.class_logits(reps).argmax(-1)
