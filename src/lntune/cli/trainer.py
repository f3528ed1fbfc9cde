"""`transformers.Trainer` wired to lntune: adapter-only checkpoints, metrics, and the training-curve plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from transformers import Trainer

from lntune.checkpoint import load_into_adapter


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold only the adapter (PEFT's files), so ``--resume`` reloads it.

    Trainer saves a model it does not know as a full state dict; lntune's `PeftModel` is written with its
    own ``save_pretrained`` instead, and resuming loads those files back with all-or-nothing checks.
    Optimizer, scheduler, RNG and step counters are Trainer's own checkpoint files.

    Args:
        token_loss: The model's loss sums over tokens and divides by ``num_items_in_batch`` (causal LM).
        *args, **kwargs: `transformers.Trainer`'s.
    """

    def __init__(self, *args, token_loss: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Trainer passes num_items_in_batch to any forward that takes **kwargs (ours does) and then
        # multiplies the loss by the number of processes. Only causal-LM losses divide by that count; a
        # classifier's loss is a batch mean, so under torchrun it would be doubled (loss and gradients).
        self.model_accepts_loss_kwargs = token_loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = output_dir or self.args.output_dir
        os.makedirs(folder, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_into_adapter(model, resume_from_checkpoint)


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for classification: share of argmax predictions equal to the label."""
    logits, labels = prediction.predictions, prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def schedule_steps(num_examples: int, batch_size: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps of a run over all processes (``WORLD_SIZE`` from torchrun/accelerate)."""
    if max_steps > 0:
        return max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, math.ceil(epochs * math.ceil(num_examples / (batch_size * world))))


def plot_curves(log_history: list[dict], path: Path) -> None:
    """Write a PNG of the training loss, eval loss and (if present) eval accuracy against the step.

    Args:
        log_history: ``trainer.state.log_history``.
        path: The PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    # The evaluation before training is logged with the prefix "before" at step 0.
    evals = [(r["step"], r.get("eval_loss", r.get("before_loss"))) for r in log_history]
    acc = [(r["step"], r.get("eval_accuracy", r.get("before_accuracy"))) for r in log_history]
    evals, acc = [e for e in evals if e[1] is not None], [a for a in acc if a[1] is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, names = ax.get_legend_handles_labels()
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s--", label="eval accuracy", color="tab:green")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    ax.set_title("lntune: LN tuning")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the axes
    fig.savefig(path)
    plt.close(fig)
