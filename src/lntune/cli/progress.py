"""What a run shows while it trains: Trainer's progress bar in a terminal, one aligned line per evaluation."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from lntune.cli.common import is_main_process


def wants_progress_bar() -> bool:
    """True when Trainer's bar should show: on rank 0, with stderr a terminal (never in logs or pipes)."""
    return is_main_process() and sys.stderr.isatty()


class ProgressBar(ProgressCallback):
    """Trainer's tqdm bars (on stderr) without the raw log dicts it prints; evaluation bars vanish when done."""

    def on_prediction_step(self, args, state, control, **kwargs):
        super().on_prediction_step(args, state, control, **kwargs)
        if self.prediction_bar is not None:
            self.prediction_bar.leave = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass  # the evaluations are shown by EvalLines, the losses in the plot


def use_progress_bar(trainer: Trainer, show: bool) -> None:
    """Replace Trainer's own printing (log dicts on stdout) by `ProgressBar` when ``show``, else by nothing.

    Args:
        trainer: A Trainer built with ``disable_tqdm=not show`` (Transformers' default hides the bar
            when its logging is set to errors only, as the command line sets it).
        show: Show the bar (see `wants_progress_bar`).
    """
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show:
        trainer.add_callback(ProgressBar)


class EvalLines(TrainerCallback):
    """Prints one aligned line per evaluation on stderr: step, train loss, eval loss, accuracy, learning rate.

    The first line is a header. Values not known yet (the train loss before step 1) show as ``-``. A resumed
    run first shows the evaluations made before it stopped: the one before training (``before``, kept in the
    work folder) and those in the checkpoint's trainer state, so the table is the whole run's.

    Args:
        total_steps: The run's steps (the width of the step column).
        before: A resumed run's evaluation before training (``before_loss``, ``before_accuracy``...).

    Example:
        >>> trainer.add_callback(EvalLines(total_steps=250))
        # stderr:    step  train loss  eval loss  accuracy  learning rate
        #           0/250           -     0.6922    0.5500              -
        #          62/250      0.6541     0.6402    0.6620        8.9e-03
    """

    def __init__(self, total_steps: int, before: dict | None = None) -> None:
        self.step_width = max(len("step"), 2 * len(str(total_steps)) + 1)
        self.total_steps = total_steps
        self.before = before
        self.header_shown = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not state.global_step:
            return  # a new run: its evaluation before training was shown as it happened
        if self.before:
            self._show(0, self.before, [])
        for entry in state.log_history:  # the checkpoint's evaluations, with the losses logged before each
            if "eval_loss" in entry and entry.get("step", 0) <= state.global_step:
                earlier = [e for e in state.log_history if "loss" in e and e.get("step", 0) <= entry["step"]]
                self._show(entry["step"], entry, earlier)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        logged = [entry for entry in state.log_history if "loss" in entry] if state.global_step else []
        self._show(state.global_step, metrics, logged)

    def _show(self, step: int, metrics: dict, logged: list[dict]) -> None:
        """One line for the evaluation ``metrics`` at ``step`` (``logged``: the train losses logged until then)."""
        loss_key = next((key for key in metrics if key.endswith("_loss")), None)
        if loss_key is None:
            return
        prefix = loss_key[: -len("loss")]
        accuracy = metrics.get(prefix + "accuracy")
        train_loss = f"{logged[-1]['loss']:.4f}" if logged else "-"
        lr = f"{logged[-1]['learning_rate']:.1e}" if logged and "learning_rate" in logged[-1] else "-"
        cells = [f"{step}/{self.total_steps}".rjust(self.step_width), f"{train_loss:>10}"]
        cells.append(f"{metrics[loss_key]:>9.4f}")
        titles = ["step".rjust(self.step_width), "train loss", "eval loss"]
        if accuracy is not None:
            cells.append(f"{accuracy:>8.4f}")
            titles.append("accuracy")
        cells.append(f"{lr:>13}")
        titles.append("learning rate")
        if not self.header_shown:
            tqdm.write("  ".join(titles), file=sys.stderr)
            self.header_shown = True
        tqdm.write("  ".join(cells), file=sys.stderr)
