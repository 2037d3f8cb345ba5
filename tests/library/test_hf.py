"""Similarity logits inside Hugging Face models (tiny random Llama / GPT-2): the swapped head's
logits, loss and generate(), the fused loss and greedy decoding, the reversible switch, and a
compiled training step."""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import hf

from helpers import assert_matches
from tiny_models import tiny_gpt2, tiny_llama


@pytest.fixture(params=[tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def model_and_bases(request):
    model = request.param(vocab=61, d=16)
    return model, vs.semantic_bases(model.get_output_embeddings().weight.detach())


def test_swapped_head_logits_loss_generate_and_restore(model_and_bases):
    model, bases = model_and_bases
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        original = model(ids).logits
    switch = hf.use_similarity_logits(model, scale=7.5, bases=bases, fused_loss=False)  # the materialising path
    out = model(ids, labels=ids)
    hidden = model.base_model(ids).last_hidden_state
    assert_matches(out.logits, vs.similarity_logits(hidden, bases, scale=7.5), tol=1e-5, name="logits")
    fused = hf.similarity_lm_loss(model, ids, bases, scale=7.5)
    assert_matches(fused, out.loss, tol=1e-5, name="fused loss vs HF loss on the swapped head")
    out.loss.backward()  # training through the swapped head works
    assert all(p.grad is not None for p in model.base_model.parameters() if p.requires_grad)
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # the tiny models' end-of-sequence token is 0 (also their padding): generate() stops a row
    # there and ends when every row has, and so must the fused greedy decoding
    eos = model.generation_config.eos_token_id
    assert torch.equal(hf.greedy_generate(model, ids, bases, max_new_tokens=6, scale=7.5, eos_token_id=eos),
                       generated)
    with pytest.raises(ValueError, match="already uses similarity"):
        hf.use_similarity_logits(model, bases=bases)
    switch.restore()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)


def test_switch_as_context_manager_and_bad_bases(model_and_bases):
    model, bases = model_and_bases
    head = model.get_output_embeddings()
    with hf.use_similarity_logits(model, bases=bases) as switch:
        assert isinstance(model.get_output_embeddings(), hf.SimilarityHead)
        assert switch.original is head
    assert model.get_output_embeddings() is head
    with pytest.raises(ValueError, match="head's shape"):
        hf.use_similarity_logits(model, bases=bases[:-1])


def test_fused_loss_masks_padding(model_and_bases):
    model, bases = model_and_bases
    ids = torch.randint(0, 61, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    got = hf.similarity_lm_loss(model, ids, bases, scale=3.0, attention_mask=mask)
    hidden = model.base_model(ids, attention_mask=mask).last_hidden_state
    logits = vs.similarity_logits(hidden[:, :-1], bases, scale=3.0)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), targets.reshape(-1))
    assert_matches(got, expected, tol=1e-5, name="masked fused loss")


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) of a training step whose loss is the fused similarity loss
    inside the HF model: one graph, no break (the custom ops have fake implementations)."""
    model = tiny_llama(vocab=61, d=16)
    bases = vs.semantic_bases(model.get_output_embeddings().weight.detach())
    ids = torch.randint(0, 61, (3, 10))

    def loss_of(m):
        return hf.similarity_lm_loss(m, ids, bases, scale=5.0)

    eager = loss_of(model)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    compiled = torch.compile(loss_of, fullgraph=True)
    loss = compiled(model)
    loss.backward()
    assert_matches(loss, eager, tol=1e-5, name="compiled loss")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(eager_grads)
    for got, ref in zip(grads, eager_grads):
        assert_matches(got, ref, tol=1e-4, name="compiled gradient")


def test_fused_loss_trains_peft_adapters():
    peft = pytest.importorskip("peft", reason="the eval extra (peft) is not installed")
    model = tiny_llama(vocab=61, d=16)
    bases = vs.semantic_bases(model.get_output_embeddings().weight.detach())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 61, (2, 8))
    loss = hf.similarity_lm_loss(wrapped, ids, bases, scale=5.0)
    loss.backward()
    trained = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert any(wrapped.get_parameter(n).grad.abs().sum() > 0 for n in trained if "lora_A" in n or "lora_B" in n)
