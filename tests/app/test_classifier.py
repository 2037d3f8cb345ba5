"""``TextClassifier`` on tiny random models: the scikit-learn surface, every method against a
plain forward pass, saving and loading (exact, in a fresh process too), and every refusal."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_baselines import WORDS, tiny_data

from vocabsem_fast.app import TextClassifier
from vocabsem_fast.app import saving as saving_module
from vocabsem_fast.app.saving import SavedClassifierError

from tiny_models import tiny_gpt2, tiny_llama, word_tokenizer_fast

METHODS = ["vds+", "vds", "probe", "zeroshot"]
QUICK = {"vds+": {"epochs": 3}, "vds": {"epochs": 3}, "probe": {"cs": 3}, "zeroshot": {}}


def _split(data, split: str):
    examples = getattr(data, split)
    return [e.fields["sentence"] for e in examples], [e.label for e in examples]


@pytest.fixture
def task():
    """(data, model, tokenizer): two classes told apart by one word, a tiny random Llama."""
    seed = int(torch.randint(1000, ()))
    return tiny_data(36, 13, seed), tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)


def _fitted(task, method: str, **options) -> TextClassifier:
    data, model, tokenizer = task
    clf = TextClassifier(data.template, data.label_words, model=model, tokenizer=tokenizer, method=method,
                         **{**QUICK[method], **options})
    texts, labels = _split(data, "train")
    assert clf.fit(texts, labels) is clf
    return clf


@torch.no_grad()
def _zero_shot_probabilities(model, tokenizer, prompt: str, first_tokens: list[int]) -> torch.Tensor:
    """One prompt, no batch, no padding: the label words' next-token probabilities."""
    logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1, first_tokens]
    return logits.float().softmax(-1)


@pytest.mark.parametrize("method", METHODS)
def test_the_sklearn_surface(task, method):
    data, _, _ = task
    clf = _fitted(task, method)
    texts, labels = _split(data, "test")
    probabilities = clf.predict_proba(texts)
    assert probabilities.shape == (len(texts), 2) and probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(texts)))
    assert not probabilities.is_inference()  # computed in inference mode, returned as an ordinary tensor
    predicted = clf.predict(texts)
    assert clf.classes_ == ["pos", "neg"]
    assert predicted == [clf.classes_[i] for i in probabilities.argmax(-1).tolist()]
    assert clf.score(texts, labels) == pytest.approx(sum(p == y for p, y in zip(predicted, labels)) / len(labels))
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, 2)
    assert clf.predict(texts[:3]) == predicted[:3]  # a text's answer does not depend on its neighbours


def test_zero_shot_is_the_models_own_next_token_answer(task):
    data, model, tokenizer = task
    clf = _fitted(task, "zeroshot", precision="float32")
    texts, _ = _split(data, "test")
    first = [tokenizer.convert_tokens_to_ids(w) for w in data.label_words.values()]
    expected = torch.stack([_zero_shot_probabilities(model, tokenizer, data.template.format(sentence=t), first)
                            for t in texts])
    torch.testing.assert_close(clf.predict_proba(texts), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_probe_predicts_what_scikit_learn_fitted(classes):
    """The probe predicts in torch from the fitted weights (a saved probe holds no scikit-learn
    object): the probabilities must be scikit-learn's own, two classes (one row of weights) or
    more, and a class without training rows gets probability 0."""
    from vocabsem_fast.app.probe import LinearProbe, ProbeConfig

    n, d = 60, 7
    labels = torch.arange(n) % classes
    features = torch.randn(n, d) + 2.0 * torch.nn.functional.one_hot(labels, d).float()
    probe = LinearProbe(classes + 1, ProbeConfig(cs=4, folds=3)).fit(features, labels)  # class `classes`: no rows
    test = torch.randn(9, d)
    z = ((test.double() - probe.shift.double()) / probe.spread.double()).numpy()
    expected = torch.from_numpy(probe.estimator.predict_proba(z)).float()
    got = probe.probabilities(test)
    torch.testing.assert_close(got[:, :classes], expected, rtol=1e-4, atol=1e-5)
    assert torch.all(got[:, classes] == 0)
    assert probe.chosen_c in torch.logspace(-4, 2, 4, dtype=torch.float64).tolist()


def test_texts_as_dicts_of_fields_and_two_field_templates():
    model, tokenizer = tiny_gpt2(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    clf = TextClassifier("Text : {premise} . {hypothesis} Label :", {"yes": "yes", "no": "no"}, model=model,
                         tokenizer=tokenizer, method="zeroshot")
    clf.fit([{"premise": "good", "hypothesis": "movie"}, {"premise": "bad", "hypothesis": "plot"}], ["yes", "no"])
    assert len(clf.predict([{"premise": "good", "hypothesis": "film", "id": 3}])) == 1
    with pytest.raises(TypeError, match=r"texts\[0\] is a string, but the template has the fields"):
        clf.predict(["good"])
    with pytest.raises(ValueError, match=r"texts\[1\] lacks the field\(s\) \['hypothesis'\]"):
        clf.predict([{"premise": "a", "hypothesis": "b"}, {"premise": "a"}])


def test_a_data_folders_labels_configure_it(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"template": "Review: {sentence} Sentiment:",
                                                      "text_fields": ["sentence"],
                                                      "label_words": {"0": "bad", "1": "good"}}))
    clf = TextClassifier.from_folder(tmp_path, method="probe", model=tiny_gpt2())
    assert clf.classes_ == ["0", "1"] and clf.text_fields == ["sentence"] and clf.method == "probe"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "svm"}, ValueError, "method must be one of vds\\+, vds, probe, zeroshot"),
    ({"template": "no placeholder"}, ValueError, "named placeholders"),
    ({"label_words": {"pos": "yes"}}, ValueError, "at least two class names"),
    ({"label_words": {"pos": "yes", "neg": 3}}, TypeError, "non-empty words"),
    ({"text_fields": ["text"]}, ValueError, "must name each of the template's placeholders"),
    ({"epochs": 3, "method": "probe"}, ValueError, "unknown option 'epochs' for method 'probe'"),
    ({"bogus": 1}, ValueError, "unknown option 'bogus' for method 'vds\\+'; valid options: "),
    ({"precision": "fp8"}, ValueError, "precision must be one of"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
    ({"seed": "1"}, TypeError, "seed must be an int"),
])
def test_bad_construction_names_the_argument(kwargs, error, match):
    args = {"template": "Text : {sentence} Label :", "label_words": {"pos": "yes", "neg": "no"}, **kwargs}
    with pytest.raises(error, match=match):
        TextClassifier(args.pop("template"), args.pop("label_words"), **args)


def test_bad_fit_and_predict_input(task):
    data, model, tokenizer = task
    clf = TextClassifier(data.template, data.label_words, model=model, tokenizer=tokenizer, method="zeroshot")
    texts, labels = _split(data, "train")
    with pytest.raises(RuntimeError, match="not fitted yet"):
        clf.predict(texts)
    with pytest.raises(ValueError, match=r"labels holds 'maybe', 'positive', not among the classes \['pos', 'neg'\]"):
        clf.fit(texts[:3], ["pos", "positive", "maybe"])
    with pytest.raises(ValueError, match="labels holds 1, not among the classes"):
        clf.fit(texts[:2], ["pos", 1])
    with pytest.raises(ValueError, match="labels has 2 entries for 3 texts"):
        clf.fit(texts[:3], labels[:2])
    with pytest.raises(TypeError, match="texts must be a list of texts"):
        clf.fit("good movie", ["pos"])
    with pytest.raises(ValueError, match="fit needs at least one labelled text"):
        clf.fit([], [])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string or a dict"):
        clf.fit(["good", 7], ["pos", "neg"])


def test_a_loaded_model_without_a_tokenizer_is_refused_clearly(task):
    data, model, _ = task
    clf = TextClassifier(data.template, data.label_words, model=model, method="zeroshot")
    with pytest.raises(ValueError, match="pass tokenizer="):
        clf.fit(*_split(data, "train"))


# ---- saving and loading ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_a_round_trip_gives_identical_probabilities(task, method, tmp_path):
    data, model, tokenizer = task
    clf = _fitted(task, method)
    texts, _ = _split(data, "test")
    before = clf.predict_proba(texts)
    clf.save_pretrained(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.safetensors", "config.json"]
    loaded = TextClassifier.from_pretrained(tmp_path / "clf", model=model, tokenizer=tokenizer)
    assert torch.equal(loaded.predict_proba(texts), before)
    assert loaded.classes_ == clf.classes_ and loaded.method == method
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["format_version"] == 1 and config["label_words"] == data.label_words
    assert config["base_model"]["fingerprint"] == clf.fingerprint_
    assert config["extraction"]["dtype"] == str(clf.extraction_dtype_).removeprefix("torch.")
    assert config["fitted"] == json.loads(json.dumps(clf.fit_summary_))


@pytest.fixture
def saved(task, tmp_path):
    """A model folder on disk, and a vds+ classifier fitted on it and saved."""
    data, model, tokenizer = task
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    clf = TextClassifier(data.template, data.label_words, model=str(tmp_path / "model"), epochs=3)
    clf.fit(*_split(data, "train"))
    clf.save_pretrained(tmp_path / "clf")
    return clf, tmp_path / "clf", data


def test_a_fresh_process_loads_it_and_gives_identical_probabilities(saved, tmp_path):
    clf, folder, data = saved
    texts, _ = _split(data, "test")
    expected = clf.predict_proba(texts)
    script = ("import sys, torch\nfrom vocabsem_fast.app import TextClassifier\n"
              "clf = TextClassifier.from_pretrained(sys.argv[1])\n"
              "torch.save(clf.predict_proba(sys.argv[3:]), sys.argv[2])\n")
    out = tmp_path / "probabilities.pt"
    subprocess.run([sys.executable, "-c", script, str(folder), str(out), *texts], check=True, timeout=300)
    assert torch.equal(torch.load(out), expected)


def test_a_different_model_is_refused_naming_both_unless_allowed(saved):
    _, folder, data = saved
    other = tiny_llama(vocab=len(WORDS) + 2)  # the same architecture, other weights
    with pytest.raises(ValueError, match=r"trained on .*model \(fingerprint [0-9a-f]{16}\), but the model given is "
                                         r"LlamaForCausalLM \(fingerprint [0-9a-f]{16}\)"):
        TextClassifier.from_pretrained(folder, model=other, tokenizer=word_tokenizer_fast(WORDS))
    with pytest.warns(UserWarning, match="used anyway"):
        clf = TextClassifier.from_pretrained(folder, model=other, tokenizer=word_tokenizer_fast(WORDS),
                                             allow_other_model=True)
    assert len(clf.predict(_split(data, "test")[0])) == len(data.test)


def test_loading_never_unpickles(saved, monkeypatch):
    _, folder, data = saved

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a classifier")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    clf = TextClassifier.from_pretrained(folder)
    assert len(clf.predict(_split(data, "test")[0][:2])) == 2


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def _edit_label_word(path: Path) -> None:
    config = json.loads(path.read_text())
    config["label_words"]["pos"] = "no"
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage, file, match", [
    (lambda p: p.unlink(), "config.json", "missing"),
    (lambda p: p.unlink(), "classifier.safetensors", "missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "classifier.safetensors", "truncated"),
    (_flip_last_byte, "classifier.safetensors", "changed since it was saved"),
    (_edit_label_word, "config.json", "edited since it was saved"),
    (lambda p: p.write_text("{not json"), "config.json", "unreadable"),
    (lambda p: p.write_text(json.dumps({"format": "something else"})), "config.json", "not a saved classifier"),
])
def test_a_damaged_folder_is_a_clear_error_naming_the_file(saved, damage, file, match):
    _, folder, _ = saved
    damage(folder / file)
    with pytest.raises(SavedClassifierError, match=match) as info:
        TextClassifier.from_pretrained(folder)
    assert str(folder / file) in str(info.value)


def test_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(SavedClassifierError, match="no such folder"):
        TextClassifier.from_pretrained(tmp_path / "nothing")


def test_an_interrupted_save_leaves_the_earlier_folder_whole(saved, monkeypatch):
    clf, folder, data = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = saving_module._file_sha256

    def interrupted(path):
        raise KeyboardInterrupt  # after the tensor file is written, before config.json

    monkeypatch.setattr(saving_module, "_file_sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clf.save_pretrained(folder)
    with pytest.raises(KeyboardInterrupt):
        clf.save_pretrained(folder.parent / "new")
    monkeypatch.setattr(saving_module, "_file_sha256", real)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (folder.parent / "new").exists()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextClassifier.from_pretrained(folder)


def test_an_unfitted_classifier_cannot_be_saved(task, tmp_path):
    data, model, tokenizer = task
    with pytest.raises(RuntimeError, match="not fitted yet"):
        TextClassifier(data.template, data.label_words, model=model, tokenizer=tokenizer).save_pretrained(tmp_path)
