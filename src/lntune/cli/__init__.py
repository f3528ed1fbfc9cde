"""The ``lntune`` command: ``train``, ``eval``, ``inspect``, ``merge`` and ``serve`` (also ``python -m lntune``).

Bad input ends with one line on stderr and exit code 2, and nothing is written; Ctrl-C ends with one
line saying what was kept, and exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lntune.cli.arguments import OneLineParser
from lntune.cli.common import Interrupted, missing_demo_modules
from lntune.errors import InputError
from lntune.loading import INSTALL_DEMO

#: The commands: name, help, and the ``module:function`` that adds its options and the one that runs it
#: (imported when the parser is built). A new command is one more row.
COMMANDS = [
    ("train", "train an LN tuning adapter (defaults: the demo job)", "train:add_arguments", "multi:run_train_command"),
    ("eval", "score an adapter; metrics as JSON on stdout", "commands:add_eval_arguments", "commands:run_eval"),
    ("inspect", "list the modules that would be tuned", "commands:add_inspect_arguments", "commands:run_inspect"),
    ("merge", "save the model with the adapter merged in", "commands:add_merge_arguments", "commands:run_merge"),
    ("serve", "serve the base model and its adapters over HTTP", "serve:add_arguments", "serve:run_serve"),
]

#: Exit codes: bad input (as argparse), and Ctrl-C (128 + SIGINT, as shells report it).
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _function(reference: str):
    """The function ``name`` of module ``lntune.cli.<module>`` for ``reference`` = ``module:name``."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(f"lntune.cli.{module}"), name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lntune`` with its commands (`COMMANDS`); errors are one line, exit code 2.

    Example:
        >>> build_parser().parse_args(["train", "--lr", "0.02"]).lr
        0.02
    """
    # No abbreviations (--epoch for --epochs): they would silently change meaning when options are added.
    parser = OneLineParser(prog="lntune", description="LayerNorm tuning of Transformers models.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, add, run in COMMANDS:
        command = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        _function(add)(command)
        command.set_defaults(run=_function(run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lntune`` with ``argv`` (default: the command line) and return the exit code.

    Example:
        >>> main(["inspect", "--model", "path/to/model"])
        0
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad options (one line on stderr already) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    where = f"lntune {args.command}"
    missing = missing_demo_modules()
    if missing:
        print(f"{where}: error: needs {', '.join(missing)} (the demo extra): {INSTALL_DEMO}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # weight-loading bars; Trainer's own bar stays
        args.run(args)
    except InputError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{where}: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
