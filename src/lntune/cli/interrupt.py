"""Ctrl-C during training: finish the step, save a checkpoint, stop (the command then exits with code 130)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

from lntune.cli.common import world_size


class StopOnInterrupt(TrainerCallback):
    """Turns the first Ctrl-C (SIGINT) during training into: finish this step, save a checkpoint, stop.

    Trainer then returns normally with the checkpoint written, so the run can be resumed from the
    very step it reached, even before its first scheduled checkpoint. A second Ctrl-C raises
    `KeyboardInterrupt` at once. Only single-process runs catch the signal: under torchrun every
    process would have to stop at the same step.

    Example:
        >>> stop = StopOnInterrupt()
        >>> trainer.add_callback(stop)
        >>> with stop.armed():
        ...     trainer.train()
        >>> stop.requested
        False
    """

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Catch SIGINT inside the block (main thread of a single-process run only)."""
        single = world_size() == 1
        if not single or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control
