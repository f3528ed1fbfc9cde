"""`transformers.Trainer` wired to lntune: adapter-only checkpoints, quiet output, metrics."""

from __future__ import annotations

import math
import os

import numpy as np
from transformers import Trainer

from lntune.checkpoint import load_into_adapter
from lntune.cli.common import world_size
from lntune.cli.progress import use_progress_bar


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold only the adapter (PEFT's files), so ``--resume`` reloads it.

    Trainer saves a model it does not know as a full state dict; lntune's `PeftModel` is written with its
    own ``save_pretrained`` instead, and resuming loads those files back with all-or-nothing checks.
    Optimizer, scheduler, RNG and step counters are Trainer's own checkpoint files. It prints no log
    dicts: the progress bar shows unless ``args.disable_tqdm`` (see `lntune.cli.progress`).

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
        use_progress_bar(self, show=not self.args.disable_tqdm)

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
    return max(1, math.ceil(epochs * math.ceil(num_examples / (batch_size * world_size()))))
