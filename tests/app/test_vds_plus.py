"""``vds+``: the zero-shot answer as a prior that a semantic clustering module corrects, with
every choice made by cross-validation on the training data."""

from __future__ import annotations

import pytest
import torch
from test_baselines import tiny_task
from torch import nn

from vocabsem_fast.app.evaluation import VDSPlus, evaluate_task, extraction_dtype, make_method
from vocabsem_fast.app.representations import Representations
from vocabsem_fast.app.semantic_clustering import SemanticClustering
from vocabsem_fast.app.vds_plus import (
    LayeredClustering,
    PlusConfig,
    VDSPlusClassifier,
    _stratified_folds,
    _stratified_split,
)


def _synthetic(n_per_class: int, *, prior_quality: float, d: int = 16, classes: int = 3, seed: int = 0):
    """Separable representations, a random map away from the label bases, and a zero-shot prior
    that is right with probability ``prior_quality``."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(classes, d, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    centres = torch.randn(classes, d, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    last = (centres[labels] + 0.5 * torch.randn(len(labels), d, generator=g)) @ rotation
    # the inner layer: the same classes under another map, with one huge channel as real inner
    # layers have (standardisation must keep it from swamping the rest)
    inner = (centres[labels] + 0.5 * torch.randn(len(labels), d, generator=g)) @ rotation.T
    inner[:, 0] = 1e4 + 1e3 * torch.randn(len(labels), generator=g)
    reps = Representations(last, last, last.abs(), inner, inner + 0.1)
    right = torch.rand(len(labels), generator=g) < prior_quality
    guess = torch.where(right, labels, torch.randint(0, classes, (len(labels),), generator=g))
    prior = torch.log_softmax(3.0 * torch.nn.functional.one_hot(guess, classes).float(), dim=-1)
    return reps, prior, labels, bases


def test_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 1)
    fit, held = _stratified_split(labels, 0.25, seed=3)
    assert sorted(fit.tolist() + held.tolist()) == list(range(13))
    assert labels[held].tolist().count(0) == 2 and labels[held].tolist().count(1) == 1
    assert 12 in fit.tolist()  # a class with one example stays in the fitting part


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_partition_the_rows_and_deal_every_class_round_them(folds):
    labels = torch.randint(0, 4, (int(torch.randint(folds, 60, ())),))
    splits = _stratified_folds(labels, folds, seed=int(torch.randint(100, ())))
    assert len(splits) == folds
    held = [h.tolist() for _, h in splits]
    assert sorted(sum(held, [])) == list(range(len(labels)))  # each row held out exactly once
    sizes = [len(h) for h in held]
    assert max(sizes) - min(sizes) <= 1
    for (fit, h) in splits:
        assert sorted(fit.tolist() + h.tolist()) == list(range(len(labels)))
    for c in labels.unique():
        per_fold = [int((labels[h] == c).sum()) for h in (torch.tensor(x, dtype=torch.long) for x in held)]
        assert max(per_fold) - min(per_fold) <= 1


def test_cross_validation_scores_every_row_once_and_needs_enough_rows():
    reps, prior, labels, bases = _synthetic(7, prior_quality=0.6)  # 21 rows
    clf = VDSPlusClassifier(bases, PlusConfig(epochs=4, folds=4)).fit(reps, prior, labels)
    for accuracy in clf.choice.candidates.values():  # accuracies over all 21 held-out rows
        assert (accuracy * 21) == pytest.approx(round(accuracy * 21))
    zeroshot = (prior.argmax(-1) == labels).float().mean().item()
    assert clf.choice.candidates["zeroshot"] == pytest.approx(zeroshot)
    with pytest.raises(ValueError, match="folds=4"):
        VDSPlusClassifier(bases, PlusConfig(folds=4)).fit(reps[:3], prior[:3], labels[:3])


@pytest.mark.parametrize("ensemble", [True, False])
def test_the_ensemble_holds_each_folds_module_at_the_chosen_epoch(ensemble):
    reps, prior, labels, bases = _synthetic(9, prior_quality=0.0, seed=2)
    config = PlusConfig(epochs=6, patience=6, folds=3, lr=3e-3, ensemble=ensemble, vocabulary=False)
    clf = VDSPlusClassifier(bases, config).fit(reps, prior, labels)
    choice = clf.choice
    assert choice.epochs > 0
    inputs = clf._inputs(reps)
    if ensemble:
        rows = [fit for fit, _ in clf._splits(labels)]
    else:
        rows = [torch.arange(len(labels))]
    # retrained without validation for the chosen epochs: the same modules, to the bit
    again, _ = clf._train(inputs, prior, labels, rows, choice.training, choice.prior_weight, choice.scale,
                          choice.epochs, config.seed)
    assert len(clf.module) == len(rows)
    for kept, fresh in zip(clf.module, again):
        for p, q in zip(kept.parameters(), fresh.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_perfect_prior_is_kept_and_training_is_skipped():
    reps, prior, labels, bases = _synthetic(20, prior_quality=1.0)
    clf = VDSPlusClassifier(bases, PlusConfig(epochs=5)).fit(reps, prior, labels)
    assert clf.choice.epochs == 0 and clf.choice.validation_accuracy == 1.0
    assert torch.equal(clf.predict(reps, prior), prior.argmax(-1))


def test_a_useless_prior_is_outgrown_by_training():
    reps, prior, labels, bases = _synthetic(40, prior_quality=0.0)
    test_reps, test_prior, test_labels, _ = _synthetic(20, prior_quality=0.0, seed=0)
    vocabulary = torch.cat([bases, torch.randn(20, bases.shape[1])])  # the label bases among 23
    clf = VDSPlusClassifier(bases, PlusConfig(epochs=40, lr=3e-3), bases=vocabulary,
                            label_token_ids=torch.arange(3)).fit(reps, prior, labels)
    assert clf.choice.epochs > 0
    assert set(clf.choice.candidates) == {"zeroshot"} | {
        f"{training} prior={a} scale=10" for training in ("classes", "vocabulary") for a in (0, 1)}
    zeroshot = (test_prior.argmax(-1) == test_labels).float().mean().item()
    accuracy = (clf.predict(test_reps, test_prior) == test_labels).float().mean().item()
    assert accuracy > 0.9 > zeroshot + 0.4


@pytest.mark.parametrize("read", ["layers", "last"])
def test_both_readings_learn_the_classes(read):
    reps, prior, labels, bases = _synthetic(40, prior_quality=0.0, seed=1)
    test_reps, test_prior, test_labels, _ = _synthetic(20, prior_quality=0.0, seed=1)
    clf = VDSPlusClassifier(bases, PlusConfig(epochs=30, lr=3e-3, read=read)).fit(reps, prior, labels)
    assert clf.choice.epochs > 0
    assert (clf.predict(test_reps, test_prior) == test_labels).float().mean().item() > 0.9
    expected = LayeredClustering if read == "layers" else SemanticClustering
    assert all(type(m) is expected for m in clf.module)


def test_reading_layers_needs_the_inner_layer():
    reps, prior, labels, bases = _synthetic(10, prior_quality=0.5)
    last_only = Representations(reps.last, reps.mean, reps.max)
    with pytest.raises(ValueError, match="inner_last"):
        VDSPlusClassifier(bases).fit(last_only, prior, labels)
    VDSPlusClassifier(bases, PlusConfig(epochs=2, read="last")).fit(last_only, prior, labels)


def test_standardisation_makes_the_module_blind_to_each_channels_scale():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(37, 3 * 8, generator=g)
    spread = torch.logspace(-2, 4, 24)
    scaled = features * spread + 3 * spread * torch.linspace(-1, 1, 24)  # inner layers: 1e-2 .. 1e4
    outs = []
    for x in (features, scaled):
        torch.manual_seed(0)
        module = LayeredClustering(8, 3).standardise_with(x)
        outs.append(module(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    one_row = LayeredClustering(8, 3).standardise_with(features[:1])  # no spread to measure: identity
    assert torch.equal(one_row.spread, torch.ones(24))


def test_a_candidate_stops_after_patience_epochs_without_a_gain():
    reps, prior, labels, bases = _synthetic(10, prior_quality=0.5)
    clf = VDSPlusClassifier(bases, PlusConfig(patience=3))
    inputs = clf._inputs(reps)
    rows = torch.arange(len(labels))
    scores = iter([[0.5], [0.6], [0.6], [0.55], [0.7], [0.7], [0.65], [0.7], [0.9]])
    _, history = clf._train(inputs, prior, labels, [rows], "classes", 0.0, 10.0, 40, 0,
                            evaluate=lambda m: next(scores))
    assert history == [[0.5], [0.6], [0.6], [0.55], [0.7], [0.7], [0.65], [0.7]]  # three without a gain: stop
    _, history = clf._train(inputs, prior, labels, [rows], "classes", 0.0, 10.0, 4, 0, evaluate=lambda m: [0.5])
    assert len(history) == 4  # epochs bound it too


def test_options_and_bad_options():
    method = make_method("vds+:epochs=7:scales=5/15:priors=1:validation=0.3")
    assert isinstance(method, VDSPlus)
    assert method.config.scales == (5.0, 15.0) and method.config.priors == (1.0,)
    assert method.config.epochs == 7 and method.config.validation == 0.3
    assert make_method("vds+:read=last:patience=5").config.read == "last"
    assert make_method("vds+:folds=1:precision=float32").config.folds == 1
    for bad in ("vds+:validation=1.5", "vds+:epochs=0", "vds+:attention=x", "vds+:depth=3", "vds+:read=inner",
                "vds+:patience=0", "vds+:folds=0", "vds+:precision=fp8", "vds+:vocabulary=no",
                "vds+:ensemble=2"):
        with pytest.raises(ValueError):
            make_method(bad)


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False), ("true", True),
                                         ("1", True)])
def test_switches_read_as_booleans(text, value):
    # "false" once stayed a (truthy) string and switched the option on
    config = make_method(f"vds+:vocabulary={text}:ensemble={text}").config
    assert config.vocabulary is value and config.ensemble is value


def test_on_a_tiny_model_with_costs_reported():
    task = tiny_task(n_train=24, n_test=9)
    results = evaluate_task(task, ["vds+:epochs=3", "zeroshot", "vds:epochs=3"])
    plus = results["vds+:epochs=3"]
    assert 0.0 <= plus["accuracy"] <= 1.0 and plus["choice"]["epochs"] in range(4)
    assert plus["choice"]["training"] in ("none", "classes", "vocabulary")
    assert "zeroshot" in plus["validation_candidates"]
    d = task.model.config.hidden_size
    module_parameters = 3 * d * 2 * d + 2 * d + 2 * d * d + d + 2 * d  # MLP 3d -> 2d -> d, LayerNorm
    folds = PlusConfig().folds  # the ensemble: one module per fold
    assert plus["trainable_parameters"] == (0 if plus["choice"]["epochs"] == 0 else folds * module_parameters)
    assert results["zeroshot"]["trainable_parameters"] == 0
    for r in results.values():
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] >= 0


def test_bfloat16_extraction_is_charged_to_the_method_that_asks_for_it():
    task = tiny_task(n_train=24, n_test=9)
    results = evaluate_task(task, ["vds+:epochs=2:precision=bfloat16", "zeroshot", "vds+:epochs=2:precision=float32"])
    bf16, fp32 = results["vds+:epochs=2:precision=bfloat16"], results["vds+:epochs=2:precision=float32"]
    assert bf16["extraction_dtype"] == "bfloat16" and fp32["extraction_dtype"] == "float32"
    assert set(bf16["extraction_seconds"]) == {"train@bfloat16", "test@bfloat16"}
    assert bf16["fit_seconds"] >= task.extraction_seconds["train@bfloat16"]
    # zeroshot computed the float32 test representations; the float32 vds+ is charged them too
    assert set(fp32["extraction_seconds"]) == {"train", "test"}
    assert fp32["predict_seconds"] >= task.extraction_seconds["test"]
    assert task.model.dtype == torch.float32  # the bfloat16 forward ran on a copy
    # the two precisions read (nearly) the same states
    low, full = task.representations("test", torch.bfloat16), task.representations("test")
    assert low.last.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low.last, full.last, dim=-1)
    assert cos.min() > 0.99


def test_auto_precision_keeps_a_model_that_is_not_float32():
    task = tiny_task()
    half = task.model.to(torch.float16)
    assert extraction_dtype("auto", half) == torch.float16
    assert extraction_dtype("float32", half) == torch.float32


@pytest.mark.parametrize("training", ["classes", "vocabulary"])
def test_modules_trained_together_learn_as_each_would_alone(training):
    reps, prior, labels, bases = _synthetic(13, prior_quality=0.5, seed=3)  # 39 rows
    vocabulary = torch.cat([bases, torch.randn(29, bases.shape[1])])
    clf = VDSPlusClassifier(bases, PlusConfig(batch_size=8), bases=vocabulary, label_token_ids=torch.arange(3))
    inputs = clf._inputs(reps)
    rows = [torch.arange(0, 39, 2), torch.arange(1, 39, 3), torch.arange(25)]  # 20, 13, 25 rows: uneven steps
    together, _ = clf._train(inputs, prior, labels, rows, training, 1.0, 10.0, 3, 0)
    for idx, joint in zip(rows, together):
        (alone,), _ = clf._train(inputs, prior, labels, [idx], training, 1.0, 10.0, 3, 0)
        for p, q in zip(joint.parameters(), alone.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["bfloat16", "float32"])
def test_the_vocabulary_loss_is_the_similarity_cross_entropy(fast, monkeypatch):
    from vocabsem_fast import reference
    from vocabsem_fast.app import vds_plus

    monkeypatch.setattr(vds_plus, "native_bfloat16", lambda device: fast)
    g = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    d, v = 24, 301
    vocabulary = torch.randn(v, d, generator=g) * torch.rand(v, 1, generator=g) * 3  # bases of any length
    clf = VDSPlusClassifier(vocabulary[:4], bases=vocabulary, label_token_ids=torch.tensor([7, 0, 290, 55]))
    assert clf._unit_bases.dtype == (torch.bfloat16 if fast else torch.float32)
    rows = torch.randn(13, d, generator=g)
    labels = torch.randint(0, 4, (13,), generator=g)
    identity = nn.Identity()
    batches = [torch.arange(0, 5), torch.arange(5, 13)]
    x = rows.clone().requires_grad_(True)
    loss = clf._loss([identity, identity], (x,), batches, None, labels, "vocabulary", 0.0, 7.0)
    loss.backward()
    y = rows.clone().requires_grad_(True)
    targets = clf.label_token_ids[labels]
    expected = sum(reference.similarity_cross_entropy(y[b], vocabulary, targets[b], scale=7.0) for b in batches)
    expected.backward()
    tolerance = dict(rtol=2e-2, atol=2e-2) if fast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(x.grad, y.grad, **tolerance)
