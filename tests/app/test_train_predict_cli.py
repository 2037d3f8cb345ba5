"""``vocabsem train`` and ``vocabsem predict`` on a tiny model folder: the round trip, streaming
in order with bounded memory, and malformed input stopping the run with no partial output."""

from __future__ import annotations

import io
import json
import tracemalloc

import pytest
import torch
from test_baselines import WORDS, tiny_data

from vocabsem_fast.app import TextClassifier, cli
from vocabsem_fast.app.streaming import predict_lines

from tiny_models import tiny_llama, word_tokenizer_fast


@pytest.fixture
def workspace(tmp_path):
    """A model folder (tiny Llama and its tokenizer) and a data folder in the shared format."""
    seed = int(torch.randint(1000, ()))
    data = tiny_data(32, 17, seed)
    tiny_llama(vocab=len(WORDS) + 2).save_pretrained(tmp_path / "model")
    word_tokenizer_fast(WORDS).save_pretrained(tmp_path / "model")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps({"template": data.template, "text_fields": list(data.text_fields),
                                                    "label_words": data.label_words}))
    for split in ("train", "test"):
        rows = [{**e.fields, "label": e.label, "id": f"{split}-{i}"} for i, e in enumerate(getattr(data, split))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, data


def _train(tmp_path, *extra) -> int:
    return cli.main(["train", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
                     "--out", str(tmp_path / "clf"), *extra])


def _one_line_error(capsys, *expected) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    for part in expected:
        assert part in err, err
    return err


def test_train_then_predict_round_trip(workspace, capsys):
    tmp_path, data = workspace
    assert _train(tmp_path, "--method", "vds+:epochs=3", "--train-limit", "20", "--seed", "3") == 0
    out = capsys.readouterr().out
    assert "cross-validation chose" in out and "validation accuracy" in out and str(tmp_path / "clf") in out
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["training"]["examples"] == 20 and config["method"] == "vds+" and config["options"] == {"epochs": 3}
    predictions = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", str(tmp_path / "clf"), "--input", str(tmp_path / "data" / "test.jsonl"),
                     "--out", str(predictions), "--batch-size", "4"]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"test-{i}" for i in range(len(data.test))]  # input order
    clf = TextClassifier.from_pretrained(tmp_path / "clf")
    texts = [e.fields["sentence"] for e in data.test]
    assert [r["label"] for r in rows] == clf.predict(texts)
    expected = clf.predict_proba(texts)
    for row, probabilities in zip(rows, expected.tolist()):
        assert list(row["probabilities"]) == clf.classes_
        assert list(row["probabilities"].values()) == probabilities  # written exactly
    assert "classified 17 texts" in capsys.readouterr().err


def test_predict_reads_json_strings_from_stdin_and_writes_stdout(workspace, capsys, monkeypatch):
    tmp_path, _ = workspace
    assert _train(tmp_path, "--method", "zeroshot") == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO('"good movie"\n\n{"sentence": "bad plot", "id": 7}\n'))
    assert cli.main(["predict", str(tmp_path / "clf")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and "id" not in rows[0] and rows[1]["id"] == 7  # the blank line is skipped
    assert all(r["label"] in ("pos", "neg") and sum(r["probabilities"].values()) == pytest.approx(1) for r in rows)


@pytest.mark.parametrize("bad_line, problem", [
    ("{not json", "not JSON"),
    ('{"text": "good"}', "lacks the field(s) ['sentence']"),
    ('{"sentence": 5}', "field 'sentence' must be a string"),
    ("[1, 2]", "must be a string or a dict"),
])
def test_a_malformed_line_stops_the_run_naming_file_and_line(workspace, capsys, bad_line, problem):
    tmp_path, _ = workspace
    assert _train(tmp_path, "--method", "zeroshot") == 0
    lines = [json.dumps({"sentence": "good movie"})] * 1500  # more than one chunk before the bad line
    lines.insert(1300, bad_line)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(tmp_path / "clf"), "--input", str(source), "--out", str(out)]) == 2
    _one_line_error(capsys, f"{source}:1301:", problem)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_malformed_line_on_stdin_leaves_no_output_file(workspace, capsys, monkeypatch):
    tmp_path, _ = workspace
    assert _train(tmp_path, "--method", "zeroshot") == 0
    lines = ['"good"'] * 1100 + ["oops"]  # found only after a first chunk was written
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", str(tmp_path / "clf"), "--out", str(out)]) == 2
    _one_line_error(capsys, "<stdin>:1101:", "not JSON")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_predicting_streams_with_bounded_lookahead_and_memory(workspace):
    """Lines are read no further ahead than one chunk of the output, and the Python memory of a
    run does not grow with the number of lines."""
    tmp_path, _ = workspace
    model, tokenizer = tiny_llama(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS)
    clf = TextClassifier("Text : {sentence} Label :", {"pos": "yes", "no": "no"}, model=model, tokenizer=tokenizer,
                         method="zeroshot").fit(["good", "bad"], ["pos", "no"])
    read = []

    class Sink:
        written = 0

        def write(self, text: str) -> None:
            Sink.written += 1
            assert len(read) - Sink.written <= 64  # never more than a chunk ahead

    def lines(count: int):
        for i in range(count):
            read.append(i)
            yield json.dumps({"sentence": f"the movie {i % 7} was good", "id": i}) + "\n"

    assert predict_lines(clf, lines(700), "generated", Sink(), progress=False, chunk=64) == 700

    def peak(count: int) -> int:
        tracemalloc.start()
        predict_lines(clf, (json.dumps({"sentence": "very good plot", "id": i}) + "\n" for i in range(count)), "g",
                      _Discard(), progress=False, chunk=64)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(256), peak(2048)
    assert large < 1.5 * small + 64 * 1024, (small, large)


class _Discard:
    def write(self, text: str) -> None:
        pass


def test_train_refuses_a_bad_method_before_any_model_work(workspace, capsys):
    tmp_path, _ = workspace
    with pytest.raises(SystemExit) as info:  # argparse: not a method at all
        _train(tmp_path, "--method", "svm")
    assert info.value.code == 2 and "--method must be one of" in capsys.readouterr().err
    assert _train(tmp_path, "--method", "vds+:bogus=1") == 2
    _one_line_error(capsys, "unknown option 'bogus'", "valid options")
    assert not (tmp_path / "clf").exists()


def test_train_refuses_an_out_folder_holding_other_files(workspace, capsys):
    tmp_path, _ = workspace
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "notes.txt").write_text("mine")
    assert _train(tmp_path, "--method", "zeroshot") == 2
    _one_line_error(capsys, "--out", "holds other files")
    assert (tmp_path / "clf" / "notes.txt").read_text() == "mine"


def test_predict_refuses_a_folder_that_is_no_classifier(workspace, capsys):
    tmp_path, _ = workspace
    assert cli.main(["predict", str(tmp_path / "data")]) == 2
    _one_line_error(capsys, "config.json", "missing")
    assert cli.main(["predict", str(tmp_path / "data"), "--input", str(tmp_path / "nope.jsonl")]) == 2
    _one_line_error(capsys, "--input", "no such file")
