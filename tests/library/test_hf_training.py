"""Drop-in fused training of Hugging Face causal LMs: ``use_similarity_logits(model,
fused_loss=True)`` makes ``model(input_ids, labels=..., num_items_in_batch=...)`` return the fused
next-token loss with ``logits=None``; checked against the materialising path (the swapped head's
logits through Hugging Face's own loss) on six architectures, through peft, and in
``transformers.Trainer``, including gradient accumulation."""

from __future__ import annotations

import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import bases as bases_module
from vocabsem_fast import hf

from helpers import assert_matches
from tiny_models import tiny_gemma, tiny_gemma2, tiny_gpt2, tiny_llama, tiny_mistral, tiny_phi, tiny_qwen2

ARCHITECTURES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma": tiny_gemma, "mistral": tiny_mistral,
                 "phi": tiny_phi, "gpt2": tiny_gpt2}
SCALE = 9.0


def _batch(vocab: int, batch: int = 3, length: int = 11):
    """Token ids with a ragged right padding (labels -100 and attention 0 there)."""
    ids = torch.randint(1, vocab, (batch, length))
    lengths = torch.randint(length // 2, length + 1, (batch,))
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _bases(model):
    return vs.semantic_bases(model.get_output_embeddings().weight.detach())


def _loss_and_grads(model, fused: bool, bases, **inputs):
    model.zero_grad()
    with hf.use_similarity_logits(model, scale=SCALE, bases=bases, fused_loss=fused):
        out = model(**inputs)
        out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("counted", [False, True], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_loss_equals_the_materialising_path(arch, counted):
    model = ARCHITECTURES[arch]()
    vocab = model.config.vocab_size
    bases = _bases(model)
    ids, mask, labels = _batch(vocab)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if counted:
        inputs["num_items_in_batch"] = torch.tensor(int((labels[:, 1:] != -100).sum()) + 5)
    fused, fused_grads = _loss_and_grads(model, True, bases, **inputs)
    plain, plain_grads = _loss_and_grads(model, False, bases, **inputs)
    assert fused.logits is None and plain.logits is not None
    assert_matches(fused.loss, plain.loss, tol=1e-5, name="loss")
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        assert_matches(fused_grads[name], plain_grads[name], tol=1e-4, name=f"{name}.grad")
    assert "forward" not in vars(model), "restore() puts the class's forward back"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_labels_and_in_generate_nothing_changes(arch):
    model = ARCHITECTURES[arch]()
    bases = _bases(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 6))
    with torch.no_grad(), hf.use_similarity_logits(model, scale=SCALE, bases=bases, fused_loss=False):
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), hf.use_similarity_logits(model, scale=SCALE, bases=bases) as switch:
        assert switch.fused_loss
        assert torch.equal(model(ids).logits, logits)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), generated)


def test_return_logits_tuple_output_and_shift_labels():
    model = tiny_llama()
    bases = _bases(model)
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad(), hf.use_similarity_logits(model, scale=SCALE, bases=bases) as switch:
        plain = model(ids, attention_mask=mask, labels=labels)
        switch.return_logits = True
        kept = model(ids, attention_mask=mask, labels=labels)
        as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
        shifted = model(ids, attention_mask=mask, shift_labels=hf.next_token_targets(labels))
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    assert_matches(kept.logits, vs.similarity_logits(hidden, bases, scale=SCALE), tol=1e-5, name="logits")
    assert torch.equal(kept.loss, plain.loss) and torch.equal(shifted.loss, plain.loss)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.loss)


@pytest.mark.parametrize("order", ["switch-then-peft", "peft-then-switch"])
def test_fused_loss_through_peft(order):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    results = {}
    for fused in (True, False):
        torch.manual_seed(3)
        base = tiny_llama()
        bases = _bases(base)
        ids, mask, labels = _batch(base.config.vocab_size)
        if order == "switch-then-peft":
            switch = hf.use_similarity_logits(base, scale=SCALE, bases=bases, fused_loss=fused)
            model = get_peft_model(base, config)
        else:
            model = get_peft_model(base, config)
            switch = hf.use_similarity_logits(model, scale=SCALE, bases=bases, fused_loss=fused)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero, so that lora_A gets a gradient too
                torch.nn.init.normal_(p, std=0.1)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("lora" in n for n in grads)
        results[fused] = (out.loss.detach(), grads, out.logits)
        switch.restore()
    assert results[True][2] is None
    assert_matches(results[True][0], results[False][0], tol=1e-5, name="loss")
    for name, grad in results[False][1].items():
        assert_matches(results[True][1][name], grad, tol=1e-4, name=name)


# --- transformers.Trainer -------------------------------------------------------------------------
def _dataset(vocab: int, n: int = 8, length: int = 12):
    torch.manual_seed(11)
    ids, mask, labels = _batch(vocab, n, length)
    return [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(n)]


def _train(tmp_path, fused: bool, batch: int, accumulation: int, steps: int = 3):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(5)
    model = tiny_llama().train()
    bases = _bases(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{fused}-{batch}-{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=7,
        data_seed=7, disable_tqdm=True, dataloader_num_workers=0,
    )
    with hf.use_similarity_logits(model, scale=SCALE, bases=bases, fused_loss=fused):
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(model.config.vocab_size))
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_fused_equals_materialising(tmp_path):
    fused_losses, fused_params = _train(tmp_path, True, batch=2, accumulation=2)
    plain_losses, plain_params = _train(tmp_path, False, batch=2, accumulation=2)
    assert len(fused_losses) == 3
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    for name, value in plain_params.items():
        assert_matches(fused_params[name], value, tol=1e-4, name=name)


def test_trainer_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Micro-batches hold different numbers of counted tokens: with num_items_in_batch the
    accumulated update is the one large batch's (a per-micro-batch mean would weigh them wrongly)."""
    _, accumulated = _train(tmp_path, True, batch=2, accumulation=2)
    _, large = _train(tmp_path, True, batch=4, accumulation=1)
    moved = max(float((accumulated[n] - large[n]).abs().max()) for n in large)
    for name, value in large.items():
        assert_matches(accumulated[name], value, tol=1e-5, name=name)
    assert moved < 1e-4


# --- what the switch must not redo --------------------------------------------------------------
def test_bases_are_cast_once_per_dtype():
    model = tiny_llama()
    bases = _bases(model)
    ids, mask, labels = _batch(model.config.vocab_size)
    with hf.use_similarity_logits(model, scale=SCALE, bases=bases) as switch:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, attention_mask=mask, labels=labels)
            first = switch.head.bases_in(torch.bfloat16)
            model(ids, attention_mask=mask, labels=labels)
        assert switch.head.bases_in(torch.bfloat16) is first and first.dtype == torch.bfloat16
        assert switch.head.bases_in(torch.float32) is switch.head.bases
        switch.head.bases.mul_(2.0)  # changed bases are cast again
        assert torch.equal(switch.head.bases_in(torch.bfloat16), switch.head.bases.bfloat16())


def test_a_known_head_is_not_hashed_again(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCABSEM_CACHE", str(tmp_path))
    calls = []
    real = bases_module.content_key
    monkeypatch.setattr(bases_module, "content_key", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama()
    first = hf.use_similarity_logits(model, scale=SCALE)
    first.restore()
    second = hf.use_similarity_logits(model, scale=SCALE)
    assert len(calls) == 1
    assert torch.equal(second.head.bases, first.head.bases)
    second.restore()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)  # a changed head is hashed (and solved) again
    hf.use_similarity_logits(model, scale=SCALE).restore()
    assert len(calls) == 2


def test_capped_logits_and_bad_switches_are_refused():
    model = tiny_gemma2()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.use_similarity_logits(model, bases=_bases(model))
    hf.use_similarity_logits(model, bases=_bases(model), fused_loss=False).restore()
    with pytest.raises(TypeError, match="fused_loss"):
        hf.use_similarity_logits(tiny_llama(), bases=_bases(tiny_llama()), fused_loss="yes")
