"""What a backend is: the ops it implements and, in one declaration, when it runs them.

A backend implements some of the ops below for tensors of some devices and dtypes; its
``Capabilities`` say which. For everything else the registry's one fallback policy applies: the
call runs on the ``torch`` backend (the chunked algorithm, any device and dtype). So a backend
method is only ever called with inputs its capabilities cover, and never falls back itself.

Every method takes 2-D row matrices (the ops flatten leading dimensions; soft assignment is
batched (B, N, d) x (B, K, d)) and returns accumulate-dtype results (float32, float64 for
float64 inputs); gradients come back in the inputs' dtypes, None where not asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import LossOptions, SimilarityOptions

# The ops of the interface. A backward belongs to its forward: a backend that runs one runs both.
OPS = ("logits", "cross_entropy", "topk", "soft_assign", "batched_argmax", "centroid_sums")
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Capabilities:
    """When a backend runs an op itself (see ``covers``)."""

    devices: tuple[str, ...]            # device types of the tensors it takes
    dtypes: tuple[torch.dtype, ...]     # input dtypes of its kernels
    ops: frozenset[str]                 # the ops of ``OPS`` it implements
    max_topk: int | None = None         # largest k of its top-k (None: any k)
    max_soft_assign_k: int | None = None  # most centroids of its soft assignment (None: any)
    topk_needs_positive_scale: bool = False  # its top-k marks taken entries with -inf
    gradients_in_forward: bool = False  # a reduced loss's gradients come out of the forward pass

    def covers(self, op: str, device: torch.device, dtype: torch.dtype, *, k: int | None = None,
               scale: float | None = None) -> bool:
        """Whether the backend runs ``op`` on ``dtype`` tensors of ``device`` (with ``k`` results
        or centroids, and ``scale``) itself."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; the ops are {OPS}")
        if op not in self.ops or device.type not in self.devices or dtype not in self.dtypes:
            return False
        if op == "topk":
            if self.max_topk is not None and k is not None and k > self.max_topk:
                return False
            if self.topk_needs_positive_scale and scale is not None and scale <= 0:
                return False
        if op == "soft_assign" and k is not None and (k < 1 or (self.max_soft_assign_k is not None
                                                                 and k > self.max_soft_assign_k)):
            return False
        return True


class Backend:
    """The interface. ``cross_entropy`` returns per-row losses (0 where the target is ignored)
    and per-row log-sum-exps; with ``weight`` (N,) and a backend whose capabilities say
    ``gradients_in_forward``, also the gradients of ``sum_i weight_i * loss_i``. Backward methods
    take the upstream gradient of every row (``row_weight``)."""

    name: str
    capabilities: Capabilities

    def logits(self, hidden: Tensor, bases: Tensor, sim: SimilarityOptions) -> Tensor:
        raise NotImplementedError

    def logits_backward(self, grad: Tensor, hidden: Tensor, bases: Tensor, sim: SimilarityOptions,
                        need_hidden: bool, need_bases: bool) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def cross_entropy(self, hidden: Tensor, bases: Tensor, targets: Tensor, sim: SimilarityOptions,
                      loss: LossOptions, weight: Tensor | None = None, need_hidden: bool = False,
                      need_bases: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def cross_entropy_backward(self, row_weight: Tensor, hidden: Tensor, bases: Tensor, targets: Tensor,
                               lse: Tensor, sim: SimilarityOptions, loss: LossOptions, need_hidden: bool,
                               need_bases: bool) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def topk(self, hidden: Tensor, bases: Tensor, k: int, sim: SimilarityOptions) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def topk_backward(self, grad_values: Tensor, hidden: Tensor, bases: Tensor, indices: Tensor,
                      sim: SimilarityOptions, need_hidden: bool, need_bases: bool):
        raise NotImplementedError

    def soft_assign(self, points: Tensor, centroids: Tensor, sim: SimilarityOptions) -> Tensor:
        raise NotImplementedError

    def soft_assign_backward(self, grad: Tensor, probs: Tensor, points: Tensor, centroids: Tensor,
                             sim: SimilarityOptions, need_points: bool, need_centroids: bool):
        raise NotImplementedError

    def batched_argmax(self, points: Tensor, centroids: Tensor, sim: SimilarityOptions) -> tuple[Tensor, Tensor]:
        """Hard assignment of B problems at once: (B, N, d) points against (B, K, d) centroids ->
        (B, N) int64 indices and (B, N) scores of each point's best centroid."""
        raise NotImplementedError

    def centroid_sums(self, points: Tensor, labels: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
        """Per-cluster sums (accumulate dtype) and counts of ``points`` (N, d) by ``labels``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
