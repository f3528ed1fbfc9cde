"""The ``lntune`` command: ``train``, ``eval``, ``inspect`` and ``merge`` (also ``python -m lntune``).

Bad input ends with one line on stderr and exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lntune.cli.common import CLIError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lntune`` with its four commands."""
    from lntune.cli import commands, serve, train

    parser = argparse.ArgumentParser(prog="lntune", description="LayerNorm tuning of Transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run, text in [
        ("train", train.add_arguments, train.run_train, "train an LN tuning adapter (defaults: the demo job)"),
        ("eval", commands.add_eval_arguments, commands.run_eval, "score an adapter; metrics as JSON on stdout"),
        ("inspect", commands.add_inspect_arguments, commands.run_inspect, "list the modules that would be tuned"),
        ("merge", commands.add_merge_arguments, commands.run_merge, "save the model with the adapter merged in"),
        ("serve", serve.add_arguments, serve.run_serve, "serve the base model and its adapters over HTTP"),
    ]:
        command = sub.add_parser(name, help=text, description=text)
        add(command)
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lntune`` with ``argv`` (default: the command line) and return the exit code.

    Example:
        >>> main(["inspect", "--model", "path/to/model"])
        0
    """
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; Trainer's own bar stays
    try:
        args.run(args)
    except CLIError as exc:
        print(f"lntune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
