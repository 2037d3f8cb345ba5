"""The semantic clustering module: shape, parameter count, and that training on frozen
representations moves examples to their label's basis."""

from __future__ import annotations

import pytest
import torch

from vocabsem_fast.app.representations import Representations
from vocabsem_fast.app.semantic_clustering import FitConfig, SemanticClustering, VDSClassifier


def test_parameter_count_is_about_33_over_8_d_squared():
    d = 576
    module = SemanticClustering(d)
    n = sum(p.numel() for p in module.parameters())
    assert abs(n / (33 / 8 * d * d) - 1) < 0.01
    out = module(torch.randn(5, d), torch.randn(5, d), torch.randn(5, d))
    assert out.shape == (5, d)


def _synthetic(n_per_class: int, d: int = 24, v: int = 50, classes: int = 3, seed: int = 0):
    """Representations that are a fixed random rotation of a class centre plus noise: the class
    is recoverable, but the raw representation is not near its label basis."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(v, d, generator=g)
    label_ids = torch.arange(classes) * 7 + 3
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    centres = torch.randn(classes, d, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    last = (centres[labels] + 0.5 * torch.randn(len(labels), d, generator=g)) @ rotation
    reps = Representations(last, last + 0.1 * torch.randn(last.shape, generator=g), last.abs())
    return reps, labels, bases, label_ids


@pytest.mark.parametrize("train_logits", ["sm", "sm-gt", "mm"])
def test_training_moves_examples_to_their_label_basis(train_logits):
    reps, labels, bases, label_ids = _synthetic(40)
    test_reps, test_labels, _, _ = _synthetic(20, seed=0)
    head = torch.linalg.pinv(bases).T if train_logits == "mm" else None  # any head whose bases these are
    config = FitConfig(epochs=40, train_logits=train_logits, predict_logits="sm", lr=3e-3)
    clf = VDSClassifier(bases, label_ids, head_weight=head, config=config).fit(reps, labels)
    accuracy = (clf.predict(test_reps) == test_labels).float().mean().item()
    assert accuracy > 0.9
    before = torch.nn.functional.cosine_similarity(
        reps.last[:, None], bases[label_ids][None], dim=-1).argmax(-1)
    assert (before == labels).float().mean().item() < 0.75  # untrained: the task is not solved


def test_bad_options_are_rejected():
    bases, ids = torch.randn(10, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="train_logits"):
        VDSClassifier(bases, ids, config=FitConfig(train_logits="xx"))
    with pytest.raises(ValueError, match="head_weight"):
        VDSClassifier(bases, ids, config=FitConfig(predict_logits="mm"))


def test_channel_attention_readings():
    d = 64
    pooled = SemanticClustering(d)
    last = SemanticClustering(d, attention="last")
    last.load_state_dict(pooled.state_dict())
    r, mean, peak = torch.randn(3, 7, d), torch.randn(3, 7, d), torch.randn(3, 7, d)
    # "last" feeds the last-token vector to both branches: "pooled" given (r, r, r)
    torch.testing.assert_close(last(r, mean, peak), pooled(r, r, r))
    assert not torch.allclose(pooled(r, mean, peak), pooled(r, r, r))
    none = SemanticClustering(d, attention="none")
    assert sum(p.numel() for p in none.parameters()) == sum(
        p.numel() for name, p in pooled.named_parameters() if not name.startswith("bottleneck"))
    torch.testing.assert_close(none(r), none.norm(none.mlp(r)))
    with pytest.raises(ValueError, match="attention"):
        SemanticClustering(d, attention="spatial")
    for bad in (dict(scale=0.0), dict(epochs=0), dict(batch_size=2.5), dict(attention="x")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FitConfig(**bad)


def test_fit_shows_progress_over_the_epochs(capsys):
    """The VDS fit ran for up to minutes without a word; with a description it shows a bar."""
    reps, labels, bases, label_ids = _synthetic(10)
    config = FitConfig(epochs=3)
    VDSClassifier(bases, label_ids, config=config).fit(reps, labels, progress="toy vds training")
    err = capsys.readouterr().err
    assert "toy vds training" in err and "3/3" in err and "loss=" in err
    VDSClassifier(bases, label_ids, config=config).fit(reps, labels)
    assert capsys.readouterr().err == ""
