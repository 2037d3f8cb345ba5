"""Property-based checks (hypothesis) of every op on every CPU backend against the reference, on
generated shapes, dtypes, scales, special rows (zero, huge, tiny, duplicated: ties), ignored
targets anywhere, label smoothing, class weights and z-loss, and non-contiguous or expanded
inputs.

Budget: the "ci" profile (default) runs a fixed, derandomised set of examples per property so the
suite stays fast and repeatable; ``HYPOTHESIS_PROFILE=release`` draws 20 times as many, at random,
for a release check (``HYPOTHESIS_PROFILE=release python -m pytest tests/library/test_properties.py``).
The triton kernels get the same properties under the interpreter in gpu_backend_cases.py's
fixed cases (the interpreter is too slow for generated ones)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import vocabsem_fast as vf
from vocabsem_fast import reference as ref

from helpers import assert_error_bound, max_error

CPU_BACKENDS = [name for name in vf.available_backends() if name in ("cpu", "torch")]
settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("release", max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL = ("zero", "huge", "tiny", "copy")  # a row replaced by zeros, x1e4, x1e-20, or another row


@st.composite
def problems(draw, *, max_v: int = 70):
    n = draw(st.integers(0, 17))
    d = draw(st.integers(1, 24))
    # V >= 2: with one class the loss is identically 0 and its gradients are 0 only by exact
    # cancellation (amplified by 1/eps at a short row, by the logits' size without normalising):
    # the fixed-shape tests cover V = 1
    v = draw(st.integers(2, max_v))
    dtype = draw(st.sampled_from(list(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    bases = torch.randn(v, d, generator=g, dtype=torch.float64)
    for x in (hidden, bases):
        for _ in range(draw(st.integers(0, 2))):
            if x.shape[0] == 0:
                break
            row = draw(st.integers(0, x.shape[0] - 1))
            kind = draw(st.sampled_from(SPECIAL))
            if kind == "zero":
                x[row] = 0
            elif kind == "huge":
                x[row] *= 1e4 if dtype != "fp16" else 1e2
            elif kind == "tiny":
                x[row] *= 1e-20 if dtype in ("fp32", "fp64") else 1e-3
            else:
                x[row] = x[draw(st.integers(0, x.shape[0] - 1))]
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    return dict(hidden=hidden, bases=bases, dtype=DTYPES[dtype], layout=layout, seed=seed,
                scale=draw(st.sampled_from([0.5, 1.0, 7.0, 20.0])), normalize=draw(st.booleans()))


def _laid_out(x64: torch.Tensor, dtype, layout: str) -> torch.Tensor:
    x = x64.to(dtype)
    if layout == "transposed":  # same values, column-major storage
        return x.T.contiguous().T
    if layout == "expanded" and x.shape[0] > 0:  # stride 0 along the rows: every row the first one
        return x[:1].expand(x.shape[0], -1)
    return x


def _inputs(p):
    h64 = _laid_out(p["hidden"], torch.float64, p["layout"])
    b64 = p["bases"].clone()
    return h64, b64, _laid_out(p["hidden"], p["dtype"], p["layout"]), b64.to(p["dtype"])


def _slack(dtype, scale, normalize) -> float:
    base = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}[dtype]
    return base * (1.0 if normalize else 4.0)


def _bounded(out, reference, truth, name, p):
    assert_error_bound(out.double(), reference.double(), truth, name=name, factor=2.0,
                       slack=_slack(p["dtype"], p["scale"], p["normalize"]))


def _raw_safe(p) -> bool:
    """Unnormalised scores of huge rows overflow fp16 in the reference itself: skip those."""
    return p["normalize"] or p["dtype"] not in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@given(p=problems(), smoothing=st.sampled_from([0.0, 0.1]), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignored=st.floats(0.0, 1.0), options=st.sampled_from(["plain", "weight", "z"]), data=st.data())
def test_cross_entropy_and_gradients(impl, p, smoothing, reduction, ignored, options, data):
    assume(_raw_safe(p))
    h64, b64, h, b = _inputs(p)
    n, v = h.shape[0], b.shape[0]
    g = torch.Generator().manual_seed(p["seed"] + 1)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    kwargs = dict(scale=p["scale"], normalize=p["normalize"], label_smoothing=smoothing, reduction=reduction)
    if options == "weight":
        kwargs["weight"] = torch.rand(v, generator=g, dtype=torch.float64) + 0.05
    elif options == "z":
        kwargs["z_loss"] = 1e-3
    upstream = torch.rand(n if reduction == "none" else (), generator=g, dtype=torch.float64)
    outs = {}
    for name, (x, y) in {"fused": (h, b), "ref": (h, b), "truth": (h64, b64)}.items():
        x, y = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
        call = dict(kwargs)
        if "weight" in call and x.dtype != torch.float64:
            call["weight"] = call["weight"].to(x.dtype)
        loss = (vf.similarity_cross_entropy(x, y, targets, impl=impl, **call) if name == "fused"
                else ref.similarity_cross_entropy(x, y, targets, **call))
        (loss.double() * upstream).sum().backward()
        outs[name] = (loss.detach(), x.grad, y.grad)
    # Where a row is shorter than eps, the normalisation's gradient is 1/eps times the gradient of
    # the normalised row, which is rounding noise where its terms cancel (colinear bases): those
    # rows' gradients are ill-conditioned on any implementation and are only required finite.
    short = {1: _short_rows(h64, p), 2: _short_rows(b64, p)}
    for i, part in enumerate(("loss", "hidden grad", "bases grad")):
        if max_error(outs["ref"][i], outs["truth"][i]) != max_error(outs["ref"][i], outs["truth"][i]):
            continue  # the reference itself is NaN in this dtype: nothing to compare against
        fused, reference, truth = outs["fused"][i], outs["ref"][i], outs["truth"][i]
        if i in short and p["normalize"]:
            assert bool(torch.isfinite(fused[short[i]]).all()), f"{impl} {part}: not finite at a short row"
            keep = ~short[i]
            fused, reference, truth = fused[keep], reference[keep], truth[keep]
        _bounded(fused, reference, truth, f"{impl} {part}", p)


def _short_rows(x64: torch.Tensor, p) -> torch.Tensor:
    return torch.linalg.vector_norm(x64.to(p["dtype"]).double(), dim=-1) < 1e-6


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@given(p=problems(), k_fraction=st.floats(0.0, 1.0))
def test_topk_values_and_indices(impl, p, k_fraction):
    assume(_raw_safe(p))
    h64, b64, h, b = _inputs(p)
    k = 1 + int(k_fraction * (b.shape[0] - 1))
    kwargs = dict(scale=p["scale"], normalize=p["normalize"])
    values, indices = vf.similarity_topk(h, b, k, impl=impl, **kwargs)
    expected, _ = ref.similarity_topk(h, b, k, **kwargs)
    truth, _ = ref.similarity_topk(h64, b64, k, **kwargs)
    _bounded(values, expected, truth, f"{impl} top-k values", p)
    # ties may break either way, but each index must hold its value and be unique in its row
    logits = ref.similarity_logits(h64, b64, **kwargs)
    picked = logits.gather(-1, indices) if indices.numel() else logits[:, :k]
    _bounded(values, expected, picked, f"{impl} value at its index", p)
    for row in indices.tolist():
        assert len(set(row)) == len(row)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@given(p=problems(max_v=40), temperature=st.sampled_from([0.05, 1.0, 3.0]), hard=st.booleans())
def test_assignment(impl, p, temperature, hard):
    assume(_raw_safe(p))
    h64, b64, h, b = _inputs(p)
    kwargs = dict(normalize=p["normalize"])
    if hard:
        indices, scores = vf.assign(h, b, hard=True, impl=impl, **kwargs)
        expected, _ = ref.assign(h, b, hard=True, **kwargs)
        truth = ref.similarity_logits(h64, b64, **kwargs)
        best = truth.max(-1).values if truth.shape[0] else truth[:, 0]
        at_index = truth.gather(-1, indices[:, None])[:, 0] if indices.numel() else best
        _bounded(at_index, best, best, f"{impl} hard assignment picks a best centroid", p)
        return
    probs = vf.assign(h, b, temperature=temperature, impl=impl, **kwargs)
    expected = ref.assign(h, b, temperature=temperature, **kwargs)
    truth = ref.assign(h64, b64, temperature=temperature, **kwargs)
    _bounded(probs, expected, truth, f"{impl} soft assignment", p)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@given(p=problems())
def test_logits(impl, p):
    assume(_raw_safe(p))
    h64, b64, h, b = _inputs(p)
    kwargs = dict(scale=p["scale"], normalize=p["normalize"])
    _bounded(vf.similarity_logits(h, b, impl=impl, **kwargs), ref.similarity_logits(h, b, **kwargs),
             ref.similarity_logits(h64, b64, **kwargs), f"{impl} logits", p)


NON_FINITE = ("inf", "-inf", "nan", "overflow")  # an entry set to +-inf, NaN, or the dtype's largest / 2


@st.composite
def non_finite_problems(draw):
    """Small problems with one to three entries of hidden or bases made non-finite, or finite but
    so large that a row's norm overflows."""
    p = draw(problems(max_v=30))
    assume(p["hidden"].shape[0] > 0)
    for _ in range(draw(st.integers(1, 3))):
        x = p["hidden"] if draw(st.booleans()) else p["bases"]
        row, col = draw(st.integers(0, x.shape[0] - 1)), draw(st.integers(0, x.shape[1] - 1))
        kind = draw(st.sampled_from(NON_FINITE))
        x[row, col] = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"),
                       "overflow": torch.finfo(p["dtype"]).max / 2}[kind]
    p["layout"] = "contiguous"
    return p


def _nan_masks(loss, hidden_grad, bases_grad):
    return loss.isnan(), hidden_grad.isnan().any(-1), bases_grad.isnan().any(-1)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@given(p=non_finite_problems(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_non_finite_inputs_give_nan_where_the_reference_does(impl, p, reduction):
    """NaN or Inf in the inputs propagate as NaN in the affected rows only, as in the reference;
    a row whose finite entries overflow its norm normalises to 0, not NaN. Normalised scores are
    judged against the float64 reference (the same math, no overflow of the dtype); raw dot
    products, which overflow the input dtype itself, against the reference in the same dtype."""
    if not p["normalize"]:
        assume(p["dtype"] in (torch.float32, torch.float64))
    h64, b64 = p["hidden"].to(p["dtype"]).double(), p["bases"].to(p["dtype"]).double()
    h, b = h64.to(p["dtype"]), b64.to(p["dtype"])
    targets = torch.randint(0, b.shape[0], (h.shape[0],), generator=torch.Generator().manual_seed(p["seed"]))
    kwargs = dict(scale=p["scale"], normalize=p["normalize"], reduction=reduction)
    masks = {}
    oracle = (h64, b64) if p["normalize"] else (h, b)
    for name, (x, y) in {"fused": (h, b), "oracle": oracle}.items():
        x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        loss = (vf.similarity_cross_entropy(x, y, targets, impl=impl, **kwargs) if name == "fused"
                else ref.similarity_cross_entropy(x, y, targets, **kwargs))
        loss.double().sum().backward()
        masks[name] = _nan_masks(loss.detach(), x.grad, y.grad)
    for part, got, expected in zip(("loss", "hidden grad rows", "bases grad rows"), masks["fused"], masks["oracle"]):
        assert torch.equal(got, expected), f"{impl} {part}: NaN at {got.tolist()}, the reference at {expected.tolist()}"
