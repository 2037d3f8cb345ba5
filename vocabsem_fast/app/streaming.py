"""``vocabsem predict``'s streaming: JSON lines in, JSON lines out, in input order, with memory
that does not grow with the number of lines.

A line is a JSON object holding the classifier's text fields (and optionally ``id``, carried
through; other keys are ignored) or, for a one-field template, a JSON string. Blank lines are
skipped. The output has one object a line: ``{"id"?, "label", "probabilities": {class: p}}``.
A malformed line stops the run with ``BadLine`` naming the file, the line and the problem; an
output file is written under a temporary name and renamed into place only when every line is
done, so a failed run leaves no partial file behind.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .classifier import CHUNK, TextClassifier


class BadLine(ValueError):
    """A line of the input that is not a text the classifier can read."""


def read_records(stream, name: str, clf: TextClassifier) -> Iterator[tuple[int, object, dict[str, str]]]:
    """``(line number, id or None, text fields)`` of each non-blank line of ``stream``."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadLine(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        ident = record.get("id") if isinstance(record, dict) else None
        try:
            fields = clf._fields(record, "the line")
        except (TypeError, ValueError) as exc:
            raise BadLine(f"{where}: {exc}") from None
        yield number, ident, fields


def check_input(path: Path, clf: TextClassifier) -> int:
    """Read a whole input file once before any forward pass (a bad line fails at once, not after
    an hour); returns how many texts it holds. Reads line by line: no more memory than a line."""
    with open(path, encoding="utf-8", errors="strict") as stream:
        try:
            return sum(1 for _ in read_records(stream, str(path), clf))
        except UnicodeDecodeError as exc:
            raise BadLine(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@contextmanager
def output_stream(out: str):
    """A text stream for ``out`` ("-": standard output). A file is written beside its final
    name and renamed into place only if the block ends without an error."""
    if out == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    path = Path(out)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            yield stream
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_lines(clf: TextClassifier, source, name: str, sink, *, total: int | None = None,
                  progress: bool = True, chunk: int = CHUNK) -> int:
    """Classify every line of ``source`` into ``sink``, ``chunk`` texts at a time; returns how
    many texts were classified. A progress bar on stderr shows texts per second."""
    from tqdm.auto import tqdm

    classes = clf.classes_
    done = 0
    with tqdm(total=total, desc="classifying", unit="text", disable=not progress, file=sys.stderr,
              smoothing=0.1) as bar:
        pending: list[tuple[object, dict[str, str]]] = []

        def flush() -> None:
            probabilities = clf.predict_proba([fields for _, fields in pending]).tolist()
            for (ident, _), row in zip(pending, probabilities):
                best = max(range(len(classes)), key=row.__getitem__)
                record = {} if ident is None else {"id": ident}
                record.update(label=classes[best], probabilities=dict(zip(classes, row)))
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(len(pending))
            pending.clear()

        try:
            for _, ident, fields in read_records(source, name, clf):
                pending.append((ident, fields))
                done += 1
                if len(pending) == chunk:
                    flush()
        except UnicodeDecodeError as exc:
            raise BadLine(f"{name}: not UTF-8 text ({exc.reason})") from None
        if pending:
            flush()
    return done
