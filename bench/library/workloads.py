"""Workloads shared by the CPU benchmarks: inputs of a given shape and each contender's run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vocabsem_fast as vs
from vocabsem_fast.backends.tiles import tile_config


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    d: int
    v: int

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.n * self.d * self.v


SHAPES = {
    "smollm2": Shape("smollm2", 2048, 576, 49152),
    # Llama-3 head; N = 1024 keeps one forward+backward near 15 s on two cores
    "llama3": Shape("llama3", 1024, 4096, 128256),
}
SCALE = 20.0  # a realistic inverse temperature for cosine logits
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(shape: Shape, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(shape.n, shape.d, generator=g, dtype=dtype)
    bases = torch.randn(shape.v, shape.d, generator=g, dtype=dtype)
    targets = torch.randint(0, shape.v, (shape.n,), generator=g)
    return hidden, bases, targets


def _linear_cross_entropy(h, b, targets):
    """torch's chunked fused linear cross-entropy on normalised inputs: the same loss."""
    hn = torch.nn.functional.normalize(h, dim=-1) * SCALE
    bn = torch.nn.functional.normalize(b, dim=-1)
    return torch.nn.functional.linear_cross_entropy(hn, bn, targets, options=torch.nn.LinearCrossEntropyOptions())


def _gemm_floor(h, b, backward: bool):
    """The arithmetic floor: the GEMMs of the same sizes and nothing else (1 forward, 3 in all)."""
    with torch.no_grad():
        z = h @ b.T
        if backward:
            z @ b
            z.T @ h
    return z[0, 0]


_COMPILED = {}


def _compiled_reference():
    """torch.compile of the reference loss (inductor), compiled once per process."""
    if "reference" not in _COMPILED:
        _COMPILED["reference"] = torch.compile(vs.reference.similarity_cross_entropy)
    return _COMPILED["reference"]


def cross_entropy_step(contender: str, hidden, bases, targets, *, backward: bool = True):
    """One forward (+ backward) of the similarity cross-entropy; returns the loss."""
    if contender == "gemm_floor":
        return _gemm_floor(hidden, bases, backward)
    h = hidden.detach().requires_grad_(backward)
    b = bases.detach().requires_grad_(backward)
    if contender == "reference":
        loss = vs.reference.similarity_cross_entropy(h, b, targets, scale=SCALE)
    elif contender == "compiled_reference":
        loss = _compiled_reference()(h, b, targets, scale=SCALE)
    elif contender == "linear_cross_entropy":
        loss = _linear_cross_entropy(h, b, targets)
    elif contender == "cpu_rows":  # the cpu backend's three-GEMM row plan, whatever its workspace
        with tile_config(strip_plan="rows"):
            loss = vs.similarity_cross_entropy(h, b, targets, scale=SCALE, impl="cpu")
            if backward:
                loss.backward()
        return loss.detach()
    else:
        loss = vs.similarity_cross_entropy(h, b, targets, scale=SCALE, impl=contender)
    if backward:
        loss.backward()
    return loss.detach()


def hard_assign_step(contender: str, points, centroids):
    """Best centroid by inner product for every point: (indices, scores)."""
    if contender == "faiss":
        import faiss

        index = faiss.IndexFlatIP(points.shape[1])
        index.add(centroids.numpy())
        scores, indices = index.search(points.numpy(), 1)
        return torch.from_numpy(indices[:, 0]), torch.from_numpy(scores[:, 0])
    if contender == "reference":
        return vs.reference.assign(points, centroids, hard=True, normalize=False)
    return vs.assign(points, centroids, hard=True, normalize=False, impl=contender)


SOFT_ASSIGN = dict(n=200_000, k=8, d=576)  # every position of a batch against a task's label words


def soft_assign_inputs(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(SOFT_ASSIGN["n"], SOFT_ASSIGN["d"], generator=g).to(dtype)
    centroids = torch.randn(SOFT_ASSIGN["k"], SOFT_ASSIGN["d"], generator=g).to(dtype)
    return points, centroids


def soft_assign_step(contender: str, points, centroids):
    if contender == "reference":
        return vs.reference.assign(points, centroids, hard=False)
    return vs.assign(points, centroids, hard=False, impl=contender)


def topk_step(contender: str, hidden, bases, k: int = 5):
    if contender == "reference":
        return vs.reference.similarity_topk(hidden, bases, k, scale=SCALE)
    return vs.similarity_topk(hidden, bases, k, scale=SCALE, impl=contender)


BACKENDS = [b for b in ("cpu", "torch") if b in vs.available_backends()]
LOSS_CONTENDERS = ["reference", *BACKENDS, "linear_cross_entropy", "gemm_floor"]
TOPK_CONTENDERS = ["reference", *BACKENDS]


ASSIGNMENT = dict(n=100_000, k=1024, d=576)


def assignment_inputs(seed: int = 0):
    """Unit-norm points and centroids (so inner product = cosine, as faiss IndexFlatIP scores)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.nn.functional.normalize(torch.randn(ASSIGNMENT["n"], ASSIGNMENT["d"], generator=g), dim=-1)
    centroids = torch.nn.functional.normalize(torch.randn(ASSIGNMENT["k"], ASSIGNMENT["d"], generator=g), dim=-1)
    return points, centroids
