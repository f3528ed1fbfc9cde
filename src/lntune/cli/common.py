"""Shared pieces of the command-line tool: errors, ranks, the demo extra (models load in `lntune.loading`)."""

from __future__ import annotations

import importlib.util
import os
import sys

from lntune.errors import InputError

#: Modules the command line imports that ``pip install lntune`` alone does not bring (the demo extra does).
DEMO_MODULES = ("transformers", "accelerate", "matplotlib")


class CLIError(InputError):
    """Bad input from the user: reported as one line on stderr with exit code 2, no traceback (as every
    `InputError`)."""


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C): one line on stderr saying what was kept, exit code 130."""


def missing_demo_modules() -> list[str]:
    """The modules of `DEMO_MODULES` that are not installed (empty when the demo extra is).

    Example:
        >>> missing_demo_modules()
        []
    """
    return [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]


def world_size() -> int:
    """The number of processes of the run (``WORLD_SIZE`` from torchrun/accelerate; 1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is rank 0 (or not distributed at all): only rank 0 prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def use_cpu() -> bool:
    """True without a GPU (or other accelerator): Trainer then runs on CPU, and torchrun uses gloo."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def say(message: str) -> None:
    """Print ``message`` on stderr from rank 0 only (stdout stays free for machine-readable output)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def plural(count: int, word: str) -> str:
    """``count`` and ``word``, in the plural unless ``count`` is 1: ``1 step``, ``250 steps``."""
    return f"{count:,d} {word}" if count == 1 else f"{count:,d} {word}s"
