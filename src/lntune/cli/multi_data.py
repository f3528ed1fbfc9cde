"""The data of ``lntune train --adapter-column``: one adapter per value of a column, each with its own labels.

Every check is made before anything is written: the column exists and holds values, each value has
training examples of at least two classes and held-out examples (from ``--eval-data`` or its own split
of ``--data``) whose labels it trained on. A value that fails ends the command with one line naming it
and what to do; ``--skip-bad-adapters`` leaves such values out instead (one line lists them).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

from lntune.cli.common import CLIError
from lntune.cli.data import Row, check_columns, is_class_name, label_name, label_names, load_table
from lntune.cli.output import RUN_NAMES

#: Held out from each value's rows when there is no ``--eval-data``.
HELD_OUT = 0.1

#: Values used as they are for folder names: letters, digits, '.', '_', '-', starting with a letter, digit or '_'.
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


@dataclass
class AdapterData:
    """One value of the adapter column: its adapter's name in the model, its folder, labels and rows.

    Args:
        value: The column's value (as a string).
        folder: Its folder under ``--output`` (the value itself when it is a safe folder name).
        name: Its adapter name in the model (``a0``, ``a1``...: any value works as a folder name).
        labels: Its class names in id order (its head has one output per name).
        train: Its training rows.
        held_out: Its held-out rows.
    """

    value: str
    folder: str
    name: str
    labels: list[str]
    train: list[Row]
    held_out: list[Row]


def folder_name(value: str) -> str:
    """The folder of ``value`` under ``--output``: the value when it is a safe folder name and none of the
    run's own (`RUN_NAMES`, in any case), else its safe characters plus 8 hex digits of its SHA-1 (so that
    different values never share a folder).

    Example:
        >>> folder_name("acme-2"), folder_name("Books & Literature"), folder_name("Checkpoints")
        ('acme-2', 'Books_Literature-574827e7', 'Checkpoints-a2b3a59a')
    """
    if _SAFE_FOLDER.fullmatch(value) and value.lower() not in RUN_NAMES:
        return value
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")[:60] or "value"
    return f"{slug}-{hashlib.sha1(value.encode('utf-8')).hexdigest()[:8]}"


def check_adapter_column(table: list[Row], path: str, flag: str, column: str) -> None:
    """Fail unless every row has a value in ``column`` that names an adapter (a string or a whole number)."""
    for number, row in enumerate(table, start=1):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if all(column not in r for r in table):
                present = ", ".join(dict.fromkeys(k for r in table for k in r))
                raise CLIError(f"{flag} {path}: no column {column!r} (columns: {present}); check --adapter-column.")
            raise CLIError(f"{flag} {path}: row {number} has no value in column {column!r} (--adapter-column).")
        if not is_class_name(value):
            raise CLIError(
                f"{flag} {path}: row {number}: {value!r} in column {column!r} cannot name an adapter; use strings or "
                "whole numbers."
            )


def group_rows(table: list[Row], column: str) -> dict[str, list[Row]]:
    """The rows of each value of ``column`` (as a string), values sorted, rows in file order."""
    groups: dict[str, list[Row]] = {}
    for row in table:
        groups.setdefault(label_name(row[column]), []).append(row)
    return {value: groups[value] for value in sorted(groups)}


def _hold_out(rows: list[Row], seed: int) -> tuple[list[Row], list[Row]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: math.ceil(HELD_OUT * len(rows))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def read_adapter_data(args) -> tuple[list[AdapterData], list[str], str]:
    """Read ``--data`` (and ``--eval-data``), split them by ``--adapter-column`` and check every value.

    Args:
        args: The parsed ``lntune train`` options.

    Returns:
        ``(adapters, left_out, eval_source)``: the adapters to train (in value order), a short description
        of each value left out by ``--skip-bad-adapters``, and where the held-out data comes from.

    Raises:
        CLIError: bad input, or a value that cannot be trained (without ``--skip-bad-adapters``).
    """
    column, text, label = args.adapter_column, args.text_column, args.label_column
    if not args.data:
        raise CLIError("--adapter-column needs --data: a file with a column naming each example's adapter.")
    if column in (text, label):
        raise CLIError(f"--adapter-column {column!r} is also the text or label column; name a third column.")
    if text == label:
        raise CLIError(f"--text-column and --label-column are both {text!r}; name two columns.")
    train_table = load_table(args.data, "--data")
    check_columns(train_table, args.data, "--data", text, label)
    check_adapter_column(train_table, args.data, "--data", column)
    groups = group_rows(train_table, column)
    held: dict[str, list[Row]] | None = None
    if args.eval_data:
        eval_table = load_table(args.eval_data, "--eval-data")
        check_columns(eval_table, args.eval_data, "--eval-data", text, label)
        check_adapter_column(eval_table, args.eval_data, "--eval-data", column)
        held = group_rows(eval_table, column)
        source = args.eval_data
    else:
        source = f"{args.data} ({HELD_OUT:.0%} of each value held out)"
    problems: list[tuple[str, str, str]] = []  # (value, short reason, the full line)
    adapters: list[AdapterData] = []
    where = f"--data {args.data}: value {{value!r}} of column {column!r}"
    skip = "pass --skip-bad-adapters to leave it out"
    for value, rows in groups.items():
        what = where.format(value=value)
        if held is None:
            if len(rows) < 2:
                line = (
                    f"{what} has {_count(len(rows), 'example')}: too few to hold one out and train; give it more "
                    f"examples, pass --eval-data, or {skip}."
                )
                problems.append((value, _count(len(rows), "example"), line))
                continue
            train, held_out = _hold_out(rows, args.seed)
        else:
            train, held_out = rows, held.get(value, [])
            if not held_out:
                line = f"{what} has no held-out examples in --eval-data {args.eval_data}; add some, or {skip}."
                problems.append((value, "no held-out examples", line))
                continue
        labels = label_names([row[label] for row in train])
        if len(labels) < 2:
            line = (
                f"{what} has only one class ({labels[0]!r}) in its {_count(len(train), 'training example')}; give it "
                f"examples of at least two classes, or {skip}."
            )
            problems.append((value, "one class", line))
            continue
        unseen = sorted({label_name(row[label]) for row in held_out} - set(labels))
        if unseen:
            line = f"{what}: its held-out labels {unseen} do not occur in its training examples; fix them, or {skip}."
            problems.append((value, "unseen held-out labels", line))
            continue
        adapters.append(AdapterData(value, folder_name(value), "", labels, train, held_out))
    if held is not None:
        for value in sorted(set(held) - set(groups)):
            line = (
                f"--eval-data {args.eval_data}: value {value!r} of column {column!r} has no training examples in "
                f"--data; add some, or {skip}."
            )
            problems.append((value, "no training examples", line))
    if problems and not args.skip_bad_adapters:
        more = f" ({len(problems) - 1} more values have problems too)" if len(problems) > 1 else ""
        line = problems[0][2]
        raise CLIError(line[:-1] + more + "." if more else line)
    if not adapters:
        raise CLIError(f"--adapter-column {column}: no value can be trained ({_listed(problems)}).")
    _check_folders(adapters, column)
    for i, adapter in enumerate(adapters):
        adapter.name = f"a{i}"
    return adapters, [f"{value!r} ({reason})" for value, reason, _ in problems], source


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _listed(problems: list[tuple[str, str, str]], shown: int = 5) -> str:
    listed = ", ".join(f"{value!r}: {reason}" for value, reason, _ in problems[:shown])
    return listed + (f", and {len(problems) - shown} more" if len(problems) > shown else "")


def _check_folders(adapters: list[AdapterData], column: str) -> None:
    seen: dict[str, str] = {}
    for adapter in adapters:
        other = seen.setdefault(adapter.folder.lower(), adapter.value)
        if other != adapter.value:
            raise CLIError(
                f"--adapter-column {column}: values {other!r} and {adapter.value!r} would share the folder "
                f"{adapter.folder!r} (folder names ignore case on some systems); rename one of them."
            )


def mapped_folders(adapters: list[AdapterData]) -> list[AdapterData]:
    """The adapters whose folder is not their value (the value was not a safe folder name)."""
    return [a for a in adapters if a.folder != a.value]
