"""Wrong invocations of the command line end in one clear line and exit status 2, before any
model work."""

from __future__ import annotations

import json

import pytest

from vocabsem_fast.app import cli


def _fails(capsys, argv, *expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for part in expected:
        assert part in err, err
    return err


def test_a_model_path_that_does_not_exist(capsys, tmp_path):
    _fails(capsys, ["lens", "hello", "--model", str(tmp_path / "no" / "such")], "--model", "no such folder")


def test_a_folder_that_is_not_a_model(capsys, tmp_path):
    _fails(capsys, ["lens", "hello", "--model", str(tmp_path)], "no config.json")


def test_a_hub_name_not_in_the_cache_fails_at_once_offline(capsys):
    _fails(capsys, ["lens", "hello", "--model", "no-such-org/no-such-model-4f1c"],
           "not in the local Hugging Face cache")


def test_an_empty_prompt(capsys):
    _fails(capsys, ["lens", "  "], "the prompt is empty")


def test_out_naming_a_directory_is_refused_before_the_work(capsys, tmp_path):
    data = _shared_format_folder(tmp_path / "data")
    _fails(capsys, ["eval", "--data", str(data), "--out", str(tmp_path)], "--out", "is a directory")


def test_a_repeated_data_folder(capsys, tmp_path):
    data = _shared_format_folder(tmp_path / "data")
    _fails(capsys, ["eval", "--data", str(data), "--data", str(tmp_path / "data" / ".")], "given twice")


@pytest.mark.parametrize("argv", [["demo", "--batch-size", "abc"], ["lens", "x", "--k", "0"]])
def test_a_bad_number_names_the_option_not_an_internal_function(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and "_positive" not in err


def test_an_unknown_method_option_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--methods", "vds:bogus=1"])
    err = capsys.readouterr().err
    assert "unknown option 'bogus'" in err and "epochs" in err and "FitConfig" not in err


def _shared_format_folder(path, *, labels=None, train=None):
    path.mkdir()
    meta = labels if labels is not None else {"template": "Review: {sentence} Sentiment:", "text_fields": ["sentence"],
                                              "label_words": {"0": "bad", "1": "good"}}
    (path / "labels.json").write_text(json.dumps(meta))
    rows = train if train is not None else [json.dumps({"sentence": "fine", "label": "1"})]
    (path / "train.jsonl").write_text("".join(r + "\n" for r in rows))
    (path / "test.jsonl").write_text(json.dumps({"sentence": "poor", "label": "0"}) + "\n")
    return path


@pytest.mark.parametrize("case,expected", [
    ("empty train", "no examples"),
    ("label_words a list", "label_words must be an object"),
    ("a line that is a string", "not a JSON object (a str)"),
    ("a line that is a list", "not a JSON object (a list)"),
    ("a lone surrogate", "lone surrogate"),
    ("no template", "has no 'template'"),
])
def test_a_malformed_data_folder_is_named_in_one_line(capsys, tmp_path, case, expected):
    meta = {"template": "Review: {sentence} Sentiment:", "text_fields": ["sentence"],
            "label_words": {"0": "bad", "1": "good"}}
    train = None
    if case == "empty train":
        train = []
    elif case == "label_words a list":
        meta["label_words"] = ["bad", "good"]
    elif case == "a line that is a string":
        train = ['"just text"']
    elif case == "a line that is a list":
        train = ["[1, 2]"]
    elif case == "a lone surrogate":
        train = ['{"sentence": "caf\\ud800", "label": "1"}']
    else:
        del meta["template"]
    data = _shared_format_folder(tmp_path / "data", labels=meta, train=train)
    _fails(capsys, ["eval", "--data", str(data)], f"--data {data}", expected)


@pytest.mark.parametrize("argv,expected", [
    (["--lr", "0"], "--lr must lie in (0, 1)"), (["--lr", "5"], "--lr must lie in (0, 1)"),
    (["--scale", "-1"], "--scale must be > 0"), (["--seq-len", "1"], "--seq-len must be at least 2"),
])
def test_finetune_options_are_checked_before_the_work(capsys, argv, expected):
    _fails(capsys, ["finetune", *argv], expected)


def test_finetune_out_naming_a_directory(capsys, tmp_path):
    _fails(capsys, ["finetune", "--out", str(tmp_path)], "is a directory")
