"""Backend registry: what is available, what "auto" picks, and life without the C++ extension."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import backends


def test_torch_is_always_available_and_auto_prefers_cpu_extension():
    names = vs.available_backends()
    assert "torch" in names
    expected = "cpu" if "cpu" in names else "torch"
    assert backends.resolve("auto", torch.device("cpu")) == expected


def test_extension_row_norms_match_torch():
    if "cpu" not in vs.available_backends():
        pytest.skip("the C++ extension is not built in this environment")
    from vocabsem_fast import _C

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(37, 131, dtype=dtype)
        expected = torch.linalg.vector_norm(x.double(), dim=-1)
        got = _C.row_norms(x)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    strided = torch.randn(50, 40)[::3, :17]  # row stride != row length
    torch.testing.assert_close(_C.row_norms(strided), torch.linalg.vector_norm(strided, dim=-1))
    assert _C.row_norms(torch.empty(0, 5)).shape == (0,)
    with pytest.raises(TypeError, match="x must be"):
        _C.row_norms(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        _C.row_norms(torch.ones(3))


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_backends_report_why_they_are_unavailable(impl):
    if impl in vs.available_backends():
        pytest.skip(f"{impl} is available on this machine: nothing to report")
    with pytest.raises(RuntimeError, match=f"impl='{impl}' is not available: .+"):
        vs.similarity_topk(torch.randn(2, 3), torch.randn(5, 3), 1, impl=impl)


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        vs.similarity_logits(torch.randn(2, 3), torch.randn(5, 3), impl="fastest")


def test_package_works_without_the_extension():
    """Blocks ``vocabsem_fast._C`` in a fresh interpreter: import, auto dispatch and an explicit
    impl='cpu' must behave (torch backend; clear RuntimeError)."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["vocabsem_fast._C"] = None  # makes "from .. import _C" raise ImportError
        import torch, vocabsem_fast as vs
        assert vs.available_backends() == ["torch"], vs.available_backends()
        h, b, t = torch.randn(5, 7), torch.randn(11, 7), torch.randint(0, 11, (5,))
        got = vs.similarity_cross_entropy(h, b, t)
        ref = vs.reference.similarity_cross_entropy(h, b, t)
        torch.testing.assert_close(got, ref)
        try:
            vs.similarity_cross_entropy(h, b, t, impl="cpu")
        except RuntimeError as exc:
            assert "not importable" in str(exc), exc
        else:
            raise AssertionError("impl='cpu' without the extension must raise")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("impl", vs.available_backends())
def test_second_backward_with_retain_graph_matches_the_first(impl):
    """A backend may hand over gradients formed in the forward pass (scaled in place by the
    first backward); a second backward must still be exact, not scaled twice or lost."""
    hidden = torch.randn(9, 13, requires_grad=True)
    bases = torch.randn(31, 13, requires_grad=True)
    targets = torch.randint(0, 31, (9,))
    loss = vs.similarity_cross_entropy(hidden, bases, targets, scale=4.0, impl=impl)
    (3.0 * loss).backward(retain_graph=True)
    first = hidden.grad.clone(), bases.grad.clone()
    hidden.grad = bases.grad = None
    (3.0 * loss).backward()
    torch.testing.assert_close(hidden.grad, first[0])
    torch.testing.assert_close(bases.grad, first[1])
    h, b = hidden.detach().requires_grad_(), bases.detach().requires_grad_()
    (3.0 * vs.reference.similarity_cross_entropy(h, b, targets, scale=4.0)).backward()
    torch.testing.assert_close(first[0], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first[1], b.grad, rtol=1e-5, atol=1e-6)
