"""Prompt representations: padding invariance, pooling, order and the disk cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from vocabsem_fast.app import representations as reps_module
from vocabsem_fast.app.representations import extract

from tiny_models import tiny_gpt2, tiny_llama, word_tokenizer_fast

WORDS = "the movie was good bad long short and very boring great fun plot".split()
PROMPTS = ["the movie was good", "very long and boring plot the movie was bad", "great",
           "the plot was short and the movie was very very fun"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-rotary", "gpt2-absolute"])
def test_a_prompt_has_the_same_representation_alone_or_padded(make, tmp_path):
    model, tokenizer = make(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    together = extract(model, tokenizer, PROMPTS, batch_size=4, use_cache=False, progress=False)
    for i, prompt in enumerate(PROMPTS):
        alone = extract(model, tokenizer, [prompt], batch_size=1, use_cache=False, progress=False)
        for name in ("last", "mean", "max", "inner_last", "inner_mean"):
            torch.testing.assert_close(getattr(together, name)[i], getattr(alone, name)[0], rtol=1e-4, atol=1e-5)


def test_pooling_and_last_token_match_a_plain_forward():
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    got = extract(model, tokenizer, PROMPTS[:2], batch_size=2, use_cache=False, progress=False)
    ids = tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    states = hidden[-1][0]
    torch.testing.assert_close(got.last[1], states[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.mean[1], states.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.max[1], states.amax(0), rtol=1e-4, atol=1e-5)
    # the inner layer: three quarters of the depth, neither the embeddings nor the last layer
    layers = len(hidden) - 1
    inner = hidden[reps_module.inner_layer(layers)][0]
    assert 0 < reps_module.inner_layer(layers) <= layers
    torch.testing.assert_close(got.inner_last[1], inner[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.inner_mean[1], inner.mean(0), rtol=1e-4, atol=1e-5)


def test_inner_layer_sits_at_three_quarters_of_the_depth():
    assert [reps_module.inner_layer(n) for n in (1, 2, 4, 12, 30, 32)] == [1, 1, 3, 9, 22, 24]


def test_rows_of_representations_select_every_field():
    model, tokenizer = tiny_gpt2(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    got = extract(model, tokenizer, PROMPTS, use_cache=False, progress=False)
    rows = got[torch.tensor([2, 0])]
    assert len(rows) == 2
    for name in ("last", "mean", "max", "inner_last", "inner_mean"):
        assert torch.equal(getattr(rows, name), getattr(got, name)[[2, 0]])


def test_batches_keep_the_prompt_order():
    model, tokenizer = tiny_gpt2(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    one_batch = extract(model, tokenizer, PROMPTS, batch_size=8, use_cache=False, progress=False)
    many = extract(model, tokenizer, PROMPTS, batch_size=1, use_cache=False, progress=False)
    torch.testing.assert_close(one_batch.last, many.last, rtol=1e-4, atol=1e-5)
    assert len(extract(model, tokenizer, [], use_cache=False, progress=False)) == 0


def test_the_batches_depend_on_the_prompts_not_their_order(monkeypatch):
    """Prompts of equal length are grouped by their text, not their position: the same prompts
    in any order make the same batches (so a classifier's answers do not depend on the order of
    its input, and an evaluation's split and the same file classified line by line agree)."""
    model, tokenizer = tiny_gpt2(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    prompts = ["the movie was good", "the plot was bad", "very long and boring", "great fun plot good",
               "the movie was bad", "short and very fun"]  # four tokens each
    batches = []
    real = reps_module._encode_batch

    def recording(reader, ids, mask):
        batches.append(sorted(map(tuple, ids.tolist())))
        return real(reader, ids, mask)

    monkeypatch.setattr(reps_module, "_encode_batch", recording)
    first = extract(model, tokenizer, prompts, batch_size=4, use_cache=False, progress=False)
    seen, batches[:] = list(batches), []
    order = torch.randperm(len(prompts)).tolist()
    again = extract(model, tokenizer, [prompts[i] for i in order], batch_size=4, use_cache=False, progress=False)
    assert batches == seen
    assert torch.equal(again.last, first.last[order])


def test_a_batchs_representations_hold_no_view_of_its_states(monkeypatch):
    """Each batch's rows are kept until all batches are done: they must own their memory, not
    view the batch's (batch, tokens, d) states (which kept every batch's states alive)."""
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    kept = []
    real = reps_module._encode_batch

    def recording(reader, ids, mask):
        out = real(reader, ids, mask)
        kept.append(out)
        return out

    monkeypatch.setattr(reps_module, "_encode_batch", recording)
    extract(model, tokenizer, PROMPTS, batch_size=2, use_cache=False, progress=False)
    for part in kept:
        for name in ("last", "mean", "max", "inner_last", "inner_mean"):
            t = getattr(part, name)
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


class ForwardPass(Exception):
    pass


def _no_forward(*args):
    raise ForwardPass


def test_second_extraction_comes_from_the_cache(tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    first = extract(model, tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(reps_module, "_encode_batch", _no_forward)
    again = extract(model, tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)
    assert torch.equal(first.last, again.last) and torch.equal(first.max, again.max)
    assert torch.equal(first.inner_last, again.inner_last) and torch.equal(first.inner_mean, again.inner_mean)
    with pytest.raises(ForwardPass):  # other prompts are not in the cache
        extract(model, tokenizer, PROMPTS[:2], cache_dir=tmp_path, progress=False)
    with pytest.raises(ForwardPass):  # nor the same prompts through the model at another precision
        extract(model.to(torch.bfloat16), tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip-data-byte"])
def test_a_damaged_cache_file_warns_and_is_recomputed(tmp_path, monkeypatch, damage):
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    first = extract(model, tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a safetensors file")
    else:
        raw[-5] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(raw))
    calls = []

    def counting(*args):
        calls.append(args)
        return real(*args)

    real = reps_module._encode_batch
    monkeypatch.setattr(reps_module, "_encode_batch", counting)
    with pytest.warns(UserWarning, match="cache") as record:
        again = extract(model, tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)
    assert any(str(path) in str(w.message) for w in record)
    assert calls  # recomputed, not read from the damaged file
    for name in ("last", "mean", "max"):
        torch.testing.assert_close(getattr(again, name), getattr(first, name))
    monkeypatch.setattr(reps_module, "_encode_batch", _no_forward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file was rewritten and is clean again
        repaired = extract(model, tokenizer, PROMPTS, cache_dir=tmp_path, progress=False)
    assert torch.equal(repaired.last, again.last)


def test_a_prompt_longer_than_the_context_keeps_its_end_and_is_reported():
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2, context=40), word_tokenizer_fast(WORDS)
    limit = reps_module.context_limit(model, reps_module.MAX_PROMPT_TOKENS)
    assert limit == 40
    long_prompt = " ".join(["the movie was very long and"] * (limit // 6 + 4)) + " the plot was great"
    assert len(tokenizer(long_prompt)["input_ids"]) > limit
    with pytest.warns(UserWarning, match=rf"1 of 2 prompts are longer than {limit} tokens"):
        got = extract(model, tokenizer, [long_prompt, "great"], batch_size=2, use_cache=False, progress=False)
    ids = tokenizer(long_prompt, return_tensors="pt")["input_ids"][:, -limit:]  # its last tokens alone
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(got.last[0], states[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.mean[0], states.mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_extraction_never_runs_the_head_nor_keeps_every_layer(make, monkeypatch):
    """Extraction needs no logits and two layers' states: the head must not run (no (batch,
    tokens, vocabulary) tensor), and the model must not be asked for every layer's states."""
    model, tokenizer = make(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    seen, flags = [], []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: flags.append(kwargs.get("output_hidden_states")), with_kwargs=True)
    got = extract(model, tokenizer, PROMPTS, batch_size=4, use_cache=False, progress=False)
    assert seen == [] and flags and not any(flags)
    assert got.inner_last.shape == got.last.shape and not torch.equal(got.inner_last, got.last)
