"""Semantic bases: the pseudoinverse, rcond, and SemanticBasis.from_model with its disk cache."""

from __future__ import annotations

import warnings

import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import bases as bases_module

from tiny_models import WordTokenizer, tiny_gpt2, tiny_llama, tiny_phi


@pytest.fixture(autouse=True)
def each_call_a_new_process(monkeypatch):
    """The disk cache is what these tests check: the in-process memory of known heads (tested in
    test_hf_training.py) is bypassed, as in a fresh process."""
    monkeypatch.setattr(bases_module, "_known_head", lambda weight, stamp: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(101, 7), (50, 13), (5, 5)])
def test_semantic_bases_is_the_float64_pseudoinverse(dtype, shape):
    head = torch.randn(*shape, dtype=dtype)
    s = vs.semantic_bases(head)
    assert s.dtype == dtype and s.shape == shape
    expected = torch.linalg.pinv(head.double()).T
    torch.testing.assert_close(s.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
    # W W+ = I_d for a full-column-rank W^T = L: L^T S is the identity
    torch.testing.assert_close(head.double().T @ s.double(), torch.eye(shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_semantic_bases_matches_the_reference():
    head = torch.randn(333, 17)
    torch.testing.assert_close(vs.semantic_bases(head), vs.reference.semantic_bases(head))


def test_rcond_truncates_small_singular_values():
    u, _ = torch.linalg.qr(torch.randn(60, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    head = u @ torch.diag(torch.tensor([1.0, 0.5, 0.2, 1e-4], dtype=torch.float64)) @ v.T
    full = vs.semantic_bases(head)
    truncated = vs.semantic_bases(head, rcond=1e-2)
    torch.testing.assert_close(truncated, torch.linalg.pinv(head, rcond=1e-2).T)
    # the truncated bases drop the 1e-4 direction, whose pseudoinverse component is 1e4
    assert full.norm() > 100 * truncated.norm()


def test_rank_deficient_head_gives_finite_minimum_norm_bases():
    head = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 6, dtype=torch.float64)  # rank 3 < d=6
    s = vs.semantic_bases(head, rcond=1e-10)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, torch.linalg.pinv(head, rcond=1e-10).T)
    # Penrose: L^T S L^T = L^T
    torch.testing.assert_close(head.T @ s @ head.T, head.T)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.randn(5), ValueError, "lm_head_weight"),
    (torch.randn(2, 3, 4), ValueError, "lm_head_weight"),
    (torch.zeros(0, 4), ValueError, "lm_head_weight"),
    (torch.ones(4, 3, dtype=torch.long), TypeError, "lm_head_weight"),
])
def test_semantic_bases_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        vs.semantic_bases(bad)


def test_negative_rcond_is_rejected():
    with pytest.raises(ValueError, match="rcond"):
        vs.semantic_bases(torch.randn(5, 3), rcond=-1.0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, tiny_phi], ids=["gpt2-tied", "llama-untied", "phi-bias"])
def test_from_model_uses_the_head_weight(make, tmp_path):
    model = make()
    basis = vs.SemanticBasis.from_model(model, cache_dir=tmp_path)
    head = model.get_output_embeddings()
    torch.testing.assert_close(basis.vectors, vs.semantic_bases(head.weight.detach()))
    assert len(basis) == head.weight.shape[0]
    if make is tiny_gpt2:
        assert head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # really tied
    if make is tiny_phi:
        assert head.bias is not None  # a bias exists and does not enter the bases


def _forbid_recompute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("bases were recomputed instead of read from the cache")

    monkeypatch.setattr(bases_module, "semantic_bases", fail)


def test_cache_is_reused(tmp_path, monkeypatch):
    model = tiny_llama()
    first = vs.SemanticBasis.from_model(model, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    _forbid_recompute(monkeypatch)
    second = vs.SemanticBasis.from_model(model, cache_dir=tmp_path)
    assert torch.equal(first.vectors, second.vectors)


def test_changed_weights_get_a_new_cache_entry(tmp_path):
    model = tiny_llama()
    first = vs.SemanticBasis.from_model(model, cache_dir=tmp_path)
    with torch.no_grad():
        model.lm_head.weight[3] += 1.0
    second = vs.SemanticBasis.from_model(model, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(first.vectors, second.vectors)
    torch.testing.assert_close(second.vectors, vs.semantic_bases(model.lm_head.weight.detach()))


@pytest.mark.parametrize("damage", ["truncate", "flip-data-byte", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage):
    model = tiny_gpt2()
    good = vs.SemanticBasis.from_model(model, cache_dir=tmp_path).vectors
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip-data-byte":
        raw[-5] ^= 0xFF  # inside the tensor data: the file still parses
    else:
        raw = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="cache"):
        rebuilt = vs.SemanticBasis.from_model(model, cache_dir=tmp_path).vectors
    assert torch.equal(rebuilt, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is clean again
        assert torch.equal(vs.SemanticBasis.from_model(model, cache_dir=tmp_path).vectors, good)


def test_stale_cache_from_another_head_is_rejected(tmp_path):
    a, b = tiny_gpt2(), tiny_gpt2()
    vs.SemanticBasis.from_model(a, cache_dir=tmp_path / "a")
    vs.SemanticBasis.from_model(b, cache_dir=tmp_path / "b")
    (path_a,) = (tmp_path / "a").glob("*.safetensors")
    (path_b,) = (tmp_path / "b").glob("*.safetensors")
    path_b.write_bytes(path_a.read_bytes())  # b's file now holds a's bases
    with pytest.warns(UserWarning, match="stale"):
        got = vs.SemanticBasis.from_model(b, cache_dir=tmp_path / "b").vectors
    torch.testing.assert_close(got, vs.semantic_bases(b.lm_head.weight.detach()))


def test_token_ids_take_the_spaced_word_and_its_last_token(tmp_path):
    model = tiny_llama(vocab=89)
    tokenizer = WordTokenizer(["good", "bad"], vocab_size=89)
    basis = vs.SemanticBasis.from_model(model, cache_dir=tmp_path, tokenizer=tokenizer)
    ids = basis.token_ids(["good", "bad", "xyz"])
    assert ids.tolist()[:2] == [1, 2]
    assert ids[2].item() == tokenizer(" xyz")["input_ids"][-1]  # a split word: its last token
    torch.testing.assert_close(basis.for_words(["bad", "good"]), basis.vectors[[2, 1]])
    with pytest.raises(TypeError, match="words"):
        basis.token_ids("good")
    with pytest.raises(ValueError, match="words"):
        basis.token_ids([""])
    with pytest.raises(ValueError, match="which"):
        basis.token_ids(["good"], which="middle")


def test_token_ids_first_or_last_token_of_a_split_word(tmp_path):
    """A word that splits: its last token by default (the label basis), its first on request
    (what next-token scoring compares); one-token words are the same either way."""
    model = tiny_llama(vocab=89)
    tokenizer = WordTokenizer(["good"], vocab_size=89)
    basis = vs.SemanticBasis.from_model(model, cache_dir=tmp_path, tokenizer=tokenizer)
    pieces = tokenizer(" xyz")["input_ids"]
    assert len(pieces) == 3 and pieces[0] != pieces[-1]
    assert basis.token_ids(["good", "xyz"]).tolist() == [1, pieces[-1]]
    assert basis.token_ids(["good", "xyz"], which="first").tolist() == [1, pieces[0]]
    torch.testing.assert_close(basis.for_words(["xyz"], which="first"), basis.vectors[[pieces[0]]])


def test_token_ids_without_a_tokenizer_says_so(tmp_path):
    basis = vs.SemanticBasis(torch.randn(10, 4))
    with pytest.raises(ValueError, match="tokenizer"):
        basis.token_ids(["good"])
