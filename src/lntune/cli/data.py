"""Reading, checking and tokenizing the tool's CSV / JSON / JSONL data through the ``datasets`` library."""

from __future__ import annotations

import os
import tempfile
from importlib import resources

from lntune.cli.common import CLIError

_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}

#: The bundled default dataset (see src/lntune/data/README.md).
DEFAULT_TRAIN = "movie_reviews_train.csv"
DEFAULT_EVAL = "movie_reviews_test.csv"


def bundled_file(name: str) -> str:
    """Path of a data file shipped in ``lntune/data`` (for example ``movie_reviews_train.csv``)."""
    return str(resources.files("lntune") / "data" / name)


def load_table(path: str, flag: str):
    """Read a CSV, JSON or JSON Lines file into a ``datasets.Dataset`` held in memory.

    Args:
        path: The file.
        flag: The option that named it (``--data``...), for error messages.

    Returns:
        A ``datasets.Dataset`` with one row per example.

    Example:
        >>> load_table("reviews.csv", "--data").column_names
        ['text', 'label']
    """
    import datasets

    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path}: file not found.")
    builder = _BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise CLIError(f"{flag} {path}: unknown file type; use a .csv, .json or .jsonl file.")
    if _has_no_rows(path, builder):
        raise CLIError(f"{flag} {path}: the file has no examples.")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors are reported as one line below
    with tempfile.TemporaryDirectory(prefix="lntune-datasets-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # datasets raises many types for unreadable files
            while exc.__cause__ is not None:  # the root cause says what is wrong with the file
                exc = exc.__cause__
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise CLIError(f"{flag} {path}: cannot read it as {builder.upper()}: {text}") from None
    if len(table) == 0:
        raise CLIError(f"{flag} {path}: the file has no examples.")
    return table


def _has_no_rows(path: str, builder: str) -> bool:
    """True for an empty file, a CSV with only its header, or a JSON Lines file of blank lines."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for line in (fh.readline() for _ in range(2)) if line.strip()]
    header = 1 if builder == "csv" else 0
    return len(lines) <= header if path.lower().endswith((".csv", ".jsonl")) else not lines


def check_columns(table, path: str, flag: str, columns: list[str]) -> None:
    """Fail if a wanted column is missing or has an empty value, naming the column and the row."""
    for column in columns:
        if column not in table.column_names:
            raise CLIError(
                f"{flag} {path}: no column {column!r} (columns: {', '.join(table.column_names)}); "
                "choose one with --text-column / --label-column."
            )
        for row, value in enumerate(table[column]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise CLIError(f"{flag} {path}: row {row + 1} has no value in column {column!r}.")


def label_names(values: list) -> list[str]:
    """Sorted distinct labels as strings (numbers sorted as numbers), in the order of their ids."""
    distinct = set(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return [str(v) for v in sorted(distinct)]
    return sorted(str(v) for v in distinct)


def check_eval_labels(train_labels: list[str], eval_values: list, path: str) -> None:
    """Fail if the eval data has a label that training never saw."""
    unseen = sorted({str(v) for v in eval_values} - set(train_labels))
    if unseen:
        raise CLIError(
            f"--eval-data {path}: labels {unseen} do not occur in the training data (labels: {train_labels})."
        )


def tokenize(table, tokenizer, text_column: str, max_length: int, label_column: str | None, labels: list[str]):
    """Token ids (and label ids for classification) for each row; other columns are dropped.

    Only ``input_ids`` and ``attention_mask`` are kept, the arguments every model's forward takes.
    """
    label_ids = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict) -> dict:
        out = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        if label_column is not None:
            encoded["labels"] = [label_ids[str(v)] for v in batch[label_column]]
        return encoded

    return table.map(encode, batched=True, remove_columns=table.column_names, keep_in_memory=True)
