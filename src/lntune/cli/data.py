"""Reading, checking and tokenizing the tool's CSV / JSON / JSONL data (standard library only).

A table is a list of rows, each a dict from column name to value: CSV values are strings; JSON
values are what the file holds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from importlib import resources

from lntune.cli.common import CLIError

Row = dict[str, object]

#: The bundled default dataset (see src/lntune/data/README.md).
DEFAULT_TRAIN = "movie_reviews_train.csv"
DEFAULT_EVAL = "movie_reviews_test.csv"

_KINDS = {".csv": "CSV", ".json": "JSON", ".jsonl": "JSON Lines"}


def bundled_file(name: str) -> str:
    """Path of a data file shipped in ``lntune/data`` (for example ``movie_reviews_train.csv``)."""
    return str(resources.files("lntune") / "data" / name)


def load_table(path: str, flag: str) -> list[Row]:
    """Read a CSV file (with a header row), a JSON array of objects, or JSON Lines (one object per line).

    A ``.json`` file may also hold one object per line. Everything is checked: a missing or
    unreadable file, an unknown extension, a file that is not UTF-8, a CSV row with a wrong number of
    fields, invalid JSON, and a file without rows each end in a `CLIError` naming the file (and line).

    Args:
        path: The file.
        flag: The option that named it (``--data``...), for error messages.

    Returns:
        The rows, in file order.

    Example:
        >>> load_table("reviews.csv", "--data")[0]
        {'text': 'a great movie', 'label': 'positive'}
    """
    kind = _KINDS.get(os.path.splitext(path)[1].lower())
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: is a folder; pass a .csv, .json or .jsonl file.")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: file not found.")
    if kind is None:
        raise CLIError(f"{flag} {path}: unknown file type; use a .csv, .json or .jsonl file.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise CLIError(f"{flag} {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot read it ({exc.strerror}).") from None
    rows = _csv_rows(text, path, flag) if kind == "CSV" else _json_rows(text, path, flag, kind)
    if not rows:
        raise CLIError(f"{flag} {path}: the file has no examples.")
    return rows


def _csv_rows(text: str, path: str, flag: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                raise CLIError(
                    f"{flag} {path}: line {reader.line_num} has {len(values)} fields, the header has {len(header)} "
                    "(quote values that contain commas)."
                )
            rows.append(dict(zip(header, values)))
    except csv.Error as exc:
        raise CLIError(f"{flag} {path}: line {reader.line_num}: not valid CSV ({exc}).") from None
    return rows


def _json_rows(text: str, path: str, flag: str, kind: str) -> list[Row]:
    if not text.strip():
        return []
    if kind == "JSON" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{flag} {path}: line {exc.lineno}: not valid JSON ({exc.msg}).") from None
        lines = [(i + 1, row) for i, row in enumerate(rows)]
        where = "item"
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    hint = " (a .json file holds an array of objects, or one object per line)" if kind == "JSON" else ""
                    raise CLIError(f"{flag} {path}: line {number}: not valid JSON ({exc.msg}){hint}.") from None
        where = "line"
    for number, row in lines:
        if not isinstance(row, dict):
            raise CLIError(f'{flag} {path}: {where} {number} is not an object like {{"text": ..., "label": ...}}.')
    return [row for _, row in lines]


def columns_of(table: list[Row]) -> list[str]:
    """Column names in the order they first appear."""
    return list(dict.fromkeys(name for row in table for name in row))


def check_columns(table: list[Row], path: str, flag: str, text_column: str, label_column: str | None) -> None:
    """Fail if a wanted column is missing, a value is empty, a text is not a string or a label not a class name.

    Args:
        table: Rows from `load_table`.
        path, flag: The file and the option that named it, for error messages.
        text_column: The column that must hold non-empty strings.
        label_column: The column that must hold class names (strings, whole numbers or booleans), or None.
    """
    wanted = [text_column] + ([label_column] if label_column else [])
    present = columns_of(table)
    for column in wanted:
        if column not in present:
            raise CLIError(
                f"{flag} {path}: no column {column!r} (columns: {', '.join(present)}); "
                "choose one with --text-column / --label-column."
            )
    for number, row in enumerate(table, start=1):
        for column in wanted:
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise CLIError(f"{flag} {path}: row {number} has no value in column {column!r}.")
        if not isinstance(row[text_column], str):
            raise CLIError(f"{flag} {path}: row {number}: column {text_column!r} holds {row[text_column]!r}, not text.")
        if label_column and not is_class_name(row[label_column]):
            raise CLIError(
                f"{flag} {path}: row {number}: label {row[label_column]!r} in column {label_column!r} is not a "
                "class name; labels must be strings or whole numbers (lntune trains classifiers, not regression)."
            )


def is_class_name(value: object) -> bool:
    """Whether ``value`` can name a class (or an adapter): a string, a whole number, a boolean."""
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return isinstance(value, (str, int))


def label_name(value: object) -> str:
    """A label as the string it is known by (``5`` and ``5.0`` in JSON, and ``"5"`` in CSV, are all ``"5"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def label_names(values: list) -> list[str]:
    """Sorted distinct labels as strings (whole numbers sorted as numbers), in the order of their ids.

    Example:
        >>> label_names(["10", "2", "2"])
        ['2', '10']
    """
    distinct = {label_name(v) for v in values}
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def check_train_labels(labels: list[str], column: str, path: str) -> None:
    """Fail unless the training data has at least two classes (one class trains nothing)."""
    if len(labels) < 2:
        raise CLIError(
            f"--data {path}: column {column!r} has only one class ({labels[0]!r}); classification needs at "
            "least two (check --label-column)."
        )


def check_eval_labels(train_labels: list[str], eval_values: list, path: str, option: str = "--eval-data") -> None:
    """Fail if the eval data (given as ``option``: ``--eval-data`` of train, ``--data`` of eval) has a label that
    training never saw."""
    unseen = sorted({label_name(v) for v in eval_values} - set(train_labels))
    if unseen:
        raise CLIError(f"{option} {path}: labels {unseen} do not occur in the training data (labels: {train_labels}).")


def hold_out(table: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off a seeded random ``fraction`` of the rows (rounded up) as held-out data.

    Returns:
        ``(train_rows, held_out_rows)``, each in file order.

    Example:
        >>> [len(part) for part in hold_out(rows_24, 0.1, seed=42)]
        [21, 3]
    """
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    held = set(order[: math.ceil(fraction * len(table))])
    return [r for i, r in enumerate(table) if i not in held], [r for i, r in enumerate(table) if i in held]


def tokenize(
    table: list[Row], tokenizer, text_column: str, max_length: int, label_column: str | None, labels: list[str]
) -> list[dict[str, list[int] | int]]:
    """Token ids (and label ids for classification) for each row; other columns are dropped.

    Only ``input_ids`` and ``attention_mask`` are kept, the arguments every model's forward takes.

    Returns:
        One dict per row, ready for Transformers' data collators.
    """
    encoded = tokenizer([row[text_column] for row in table], truncation=True, max_length=max_length)
    pairs = zip(encoded["input_ids"], encoded["attention_mask"])
    examples: list[dict] = [{"input_ids": ids, "attention_mask": mask} for ids, mask in pairs]
    if label_column is not None:
        label_ids = {name: i for i, name in enumerate(labels)}
        for example, row in zip(examples, table):
            example["labels"] = label_ids[label_name(row[label_column])]
    return examples
