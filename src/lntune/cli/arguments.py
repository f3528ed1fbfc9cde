"""Argument parsing for ``lntune``: one-line errors and option types that refuse bad numbers up front."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

#: The largest seed NumPy and Trainer accept (``set_seed`` needs 0 <= seed < 2**32).
MAX_SEED = 2**32 - 1


class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line on stderr (no usage block), exit code 2.

    Its sub-command parsers are of the same class, so ``lntune train --lr x`` reports one line too.
    `parse_args` keeps the words it parsed as ``argv`` on the result (``--resume`` repeats them).

    Example:
        >>> OneLineParser(prog="lntune").parse_args(["--nope"])  # stderr: lntune: error: unrecognized ...
    """

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        words = list(sys.argv[1:] if args is None else args)
        parsed, extra = self.parse_known_args(words, namespace)
        if extra:  # reported by the sub-command it was given to
            command = getattr(parsed, "command", None)
            _fail(f"{self.prog} {command}" if command else self.prog, f"unrecognized arguments: {' '.join(extra)}")
        parsed.argv = words
        return parsed

    def error(self, message: str) -> NoReturn:
        _fail(self.prog, message)


def _fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` as one line on stderr and exit with code 2, as argparse does."""
    sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
    sys.exit(2)


def _number(text: str, kind: type, allowed, expected: str, bound: str):
    """``text`` as a ``kind`` (int or float) that ``allowed`` accepts; else argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An option value that must be a whole number above 0 (``--batch-size``, ``--max-length``...).

    Example:
        >>> positive_int("16")
        16
    """
    return _number(text, int, lambda v: v > 0, "a whole number above 0", "above 0")


def positive_float(text: str) -> float:
    """An option value that must be a finite number above 0 (``--lr``, ``--epochs``): no nan, no inf.

    Example:
        >>> positive_float("1e-2")
        0.01
    """
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a number above 0", "a finite number above 0")


def non_negative_float(text: str) -> float:
    """An option value that must be a finite number, 0 or more (``--max-wait-ms``).

    Example:
        >>> non_negative_float("0")
        0.0
    """
    return _number(
        text, float, lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more", "a finite number, 0 or more"
    )


def port(text: str) -> int:
    """A TCP port: a whole number from 0 (any free port) to 65535.

    Example:
        >>> port("8000")
        8000
    """
    return _number(text, int, lambda v: 0 <= v <= 65535, "a whole number", "from 0 to 65535")


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1 (what NumPy, and so Trainer, accepts).

    Example:
        >>> seed("42")
        42
    """
    return _number(text, int, lambda v: 0 <= v <= MAX_SEED, "a whole number", f"from 0 to {MAX_SEED}")
