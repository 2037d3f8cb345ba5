"""The evaluation harness: method specs, metrics, representation analysis, time accounting, and
`vocabsem eval` end to end on a tiny saved model and data folder."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_baselines import WORDS, tiny_data, tiny_task

from vocabsem_fast.app import cli
from vocabsem_fast.app.evaluation import (
    VDS,
    cluster_quality,
    evaluate_task,
    knn_accuracy,
    make_method,
    parse_methods,
    scores,
)

from tiny_models import tiny_llama, word_tokenizer_fast


def test_method_specs():
    vds = make_method("vds:train=sm-gt:predict=mm:attention=last:scale=12.5:epochs=3")
    assert isinstance(vds, VDS)
    assert (vds.config.train_logits, vds.config.predict_logits, vds.config.attention) == ("sm-gt", "mm", "last")
    assert vds.config.scale == 12.5 and vds.config.epochs == 3
    assert make_method("icl:shots=8").shots == 8
    assert make_method("knn:k=3").k == 3
    assert make_method("ia3:epochs=1").name == "ia3"
    assert parse_methods("vds, knn,icl") == ["vds", "knn", "icl"]
    for bad, match in [("nope", "unknown method"), ("icl:shots", "key=value"),
                       ("icl:depth=2", "unknown option .depth.*valid options: shots"),
                       ("vds:attention=sideways", "attention"), ("", "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_methods(bad) if bad == "" else make_method(bad)


def test_scores_against_a_hand_count():
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    # per class: precision/recall 0: 1/2, 1/2; 1: 2/3, 1; 2: 1, 2/3
    f1 = [0.5, 2 * (2 / 3) / (5 / 3), 2 * (2 / 3) / (5 / 3)]
    got = scores(truth, predicted, 4)  # a fourth class that never occurs counts as F1 0
    assert got["accuracy"] == pytest.approx(5 / 7)
    assert got["macro_f1"] == pytest.approx(sum(f1) / 4)


def test_knn_accuracy_and_cluster_quality_on_separable_points():
    centres = torch.randn(3, 8) * 5
    labels = torch.arange(3).repeat(20)
    points = centres[labels] + 0.05 * torch.randn(60, 8)
    assert knn_accuracy(points[:30], labels[:30], points[30:], labels[30:]) == 1.0
    assert cluster_quality(points, labels, 3, seed=1) == pytest.approx(1.0)
    shuffled = labels[torch.randperm(60)]
    assert knn_accuracy(points[:30], shuffled[:30], points[30:], shuffled[30:]) < 0.9
    assert cluster_quality(points, shuffled, 3, seed=1) < 0.3


def test_evaluate_task_scores_every_method_and_charges_shared_representations(tmp_path):
    task = tiny_task(n_train=21, n_test=9)
    specs = ["vds:epochs=3", "knn:k=3", "icl:shots=1", "rag:shots=1", "lora:epochs=1", "ia3:epochs=1",
             "zeroshot", "cosine"]
    seen = []
    results = evaluate_task(task, specs, plot_dir=tmp_path, on_result=lambda spec, r: seen.append(spec))
    assert list(results) == specs == seen
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        assert r["seconds"] == pytest.approx(r["fit_seconds"] + r["predict_seconds"])
        assert (r["train_size"], r["test_size"]) == (21, 9)
    # vds computed the representations; knn and the rest reuse them but are charged their time
    assert results["knn:k=3"]["fit_seconds"] >= task.extraction_seconds["train"]
    assert results["zeroshot"]["predict_seconds"] >= task.extraction_seconds["test"]
    assert results["knn:k=3"]["extraction_seconds"] == {s: task.extraction_seconds[s] for s in ("train", "test")}
    assert results["zeroshot"]["extraction_seconds"] == {"test": task.extraction_seconds["test"]}
    assert results["icl:shots=1"]["extraction_seconds"] == {}
    analysis = results["vds:epochs=3"]["analysis"]
    assert set(analysis) == {"ari_before", "ari_after", "knn_accuracy_before", "knn_accuracy_after"}
    assert (tmp_path / "tiny-vds_epochs-3.png").stat().st_size > 1000
    # the accuracy reported is that of the predictions
    method = make_method("zeroshot").fit(task)
    assert results["zeroshot"]["accuracy"] == pytest.approx(
        (method.predict(task) == task.labels("test")).float().mean().item())


def _data_folder(root, seed: int):
    data = tiny_data(30, 12, seed)
    root.mkdir()
    for split in ("train", "test"):
        with open(root / f"{split}.jsonl", "w") as f:
            for e in getattr(data, split):
                f.write(json.dumps({**e.fields, "label": e.label}) + "\n")
    (root / "labels.json").write_text(json.dumps({"template": data.template, "text_fields": ["sentence"],
                                                  "label_words": data.label_words}))
    return root


def test_vocabsem_eval_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOCABSEM_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    tiny_llama(vocab=len(WORDS) + 2).save_pretrained(model_dir)
    word_tokenizer_fast(WORDS).save_pretrained(model_dir)
    folder = _data_folder(tmp_path / "tiny", random.randrange(1000))
    out = tmp_path / "results.json"
    code = cli.main(["eval", "--data", str(folder), "--model", str(model_dir), "--methods",
                     "vds:epochs=2,knn,icl:shots=1,lora:epochs=1", "--train-limit", "20", "--test-limit", "10",
                     "--out", str(out), "--plot", str(tmp_path / "plots"), "--no-cache", "--nproc", "2"])
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results) == ["tiny"]
    assert list(results["tiny"]) == ["vds:epochs=2:nproc=2", "knn", "icl:shots=1", "lora:epochs=1"]
    for r in results["tiny"].values():
        assert {"accuracy", "macro_f1", "seconds"} <= set(r) and r["test_size"] == 10 and r["train_size"] == 20
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "lora:epochs=1" in printed and "ARI" in printed
    assert (tmp_path / "plots" / "tiny-vds_epochs-2_nproc-2.png").exists()
    assert (tmp_path / "plots" / "frontier.png").stat().st_size > 1000  # accuracy against fit time


def test_vocabsem_eval_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["eval", "--data", str(tmp_path)]) == 2
    assert "not a data folder" in capsys.readouterr().err
    for argv, match in [(["eval", "--data", str(tmp_path), "--methods", "vds,bogus"], "unknown method"),
                        (["eval", "--data", str(tmp_path), "--train-limit", "0"], "positive")]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert match in capsys.readouterr().err


def test_method_costs_and_the_frontier(tmp_path):
    from vocabsem_fast.app.evaluation import frontier_methods, method_costs, plot_frontier

    def result(acc, fit, params, memory):
        return {"accuracy": acc, "macro_f1": acc / 2, "fit_seconds": fit, "predict_seconds": 1.0,
                "trainable_parameters": params, "peak_memory_mib": memory}

    results = {"a": {"cheap": result(0.5, 0.1, 0, 10.0), "dear": result(0.9, 100.0, 5, None)},
               "b": {"cheap": result(0.7, 0.3, 0, 30.0), "dear": result(0.7, 300.0, 5, None)}}
    costs = method_costs(results)
    assert costs["cheap"]["accuracy"] == pytest.approx(0.6) and costs["cheap"]["fit_seconds"] == pytest.approx(0.2)
    assert costs["cheap"]["peak_memory_mib"] == 30.0 and costs["dear"]["peak_memory_mib"] is None
    assert costs["dear"]["trainable_parameters"] == 5 and costs["dear"]["sets"] == 2
    assert plot_frontier(results, tmp_path / "f.png").stat().st_size > 1000
    costs = {"cosine": {"fit_seconds": 0.0, "accuracy": 0.4}, "zeroshot": {"fit_seconds": 0.0, "accuracy": 0.5},
             "slow-worse": {"fit_seconds": 9.0, "accuracy": 0.45}, "slow-better": {"fit_seconds": 9.0, "accuracy": 0.8}}
    assert frontier_methods(costs) == ["zeroshot", "slow-better"]  # equal time: only the more accurate
