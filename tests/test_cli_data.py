"""The command line's data reader (standard library only): CSV, JSON and JSON Lines, labels, held-out split."""

from __future__ import annotations

import json

import pytest

from lntune.cli.common import CLIError
from lntune.cli.data import check_columns, hold_out, label_names, load_table


def test_csv_with_bom_crlf_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    text = '\ufefftext,label\r\n"great, really",positive\r\n\r\n"two\nlines",negative\r\n'
    path.write_bytes(text.encode("utf-8"))
    rows = load_table(str(path), "--data")
    assert rows == [{"text": "great, really", "label": "positive"}, {"text": "two\nlines", "label": "negative"}]


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_json_lines_in_json_and_jsonl_files(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 2}\n')
    assert load_table(str(path), "--data") == [{"text": "a", "label": 1}, {"text": "b", "label": 2}]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": True}, {"text": "b", "label": False}]))
    rows = load_table(str(path), "--data")
    check_columns(rows, str(path), "--data", "text", "label")
    assert label_names([r["label"] for r in rows]) == ["False", "True"]


def test_labels_are_names_and_whole_numbers_sort_as_numbers():
    assert label_names(["10", "2", "2", "-1"]) == ["-1", "2", "10"]
    assert label_names([5, 5.0, "5", 1]) == ["1", "5"]  # JSON 5 and 5.0 and CSV "5" are one class
    assert label_names(["b", "a", "10"]) == ["10", "a", "b"]


def test_held_out_split_is_seeded_rounded_up_and_disjoint():
    rows = [{"i": i} for i in range(24)]
    train, held = hold_out(rows, 0.1, seed=42)
    assert (len(train), len(held)) == (21, 3)
    assert sorted(r["i"] for r in train + held) == list(range(24))
    assert hold_out(rows, 0.1, seed=42) == (train, held) and hold_out(rows, 0.1, seed=1) != (train, held)


def test_a_float_label_names_the_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.5}\n')
    rows = load_table(str(path), "--data")
    with pytest.raises(CLIError, match=r"row 2: label 0.5 in column 'label' is not a class name"):
        check_columns(rows, str(path), "--data", "text", "label")
