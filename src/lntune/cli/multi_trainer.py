"""`MultiAdapterTrainer`: `AdapterTrainer` for many adapters trained together in mixed batches.

* The loss is each sample's cross-entropy over its own adapter's classes (`lntune.adapter_cross_entropy`;
  the model's own loss assumes one head size), scaled by ``1 / batch size`` per sample.
* The training order is `lntune.AdapterBatchSampler`'s: each adapter's examples in runs of the batch size.
* The optimizer is `lntune.AdapterAdamW`: each adapter steps once per batch of its own examples, with its
  own learning-rate schedule (Trainer's, over the adapter's own steps) and its own gradient clipping, as
  its own run would. Trainer's scheduler only reports the run's schedule.
* Evaluation reports each adapter's loss and accuracy (`evaluations`); the numbers Trainer logs are
  their means (and the lowest accuracy), computed over the processes of a distributed run.
* Checkpoints hold every adapter (PEFT's layout: one subfolder each); resuming loads each back, and the
  optimizer's state carries the gradients adapters had accumulated.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback, get_scheduler

from lntune.checkpoint import load_into_adapter
from lntune.cli.trainer import AdapterTrainer
from lntune.multi_adapter import AdapterAdamW, AdapterBatchSampler, adapter_cross_entropy


class MultiAdapterTrainer(AdapterTrainer):
    """A Trainer of many adapters at once (see the module docstring).

    Args:
        adapters: The adapters to train (every example's ``adapter_name`` is one of them).
        epoch_examples: ``{adapter: its training examples}``: a partial batch steps at the end of its epoch.
        schedules: ``{adapter: (peak learning rate, warm-up steps, steps)}``: the schedule its own run would
            follow (Trainer's ``lr_scheduler_type``, over the adapter's own steps).
        max_grad_norm: Clip each adapter's gradient to this norm (None: no clipping).
        total_steps: The run's steps; its last steps every adapter with examples pending.
        *args, **kwargs: `AdapterTrainer`'s (``args.max_grad_norm`` must be 0: clipping is per adapter).
    """

    def __init__(
        self,
        *args,
        adapters: list[str],
        epoch_examples: dict[str, int],
        schedules: dict[str, tuple[float, int, int]],
        max_grad_norm: float | None,
        total_steps: int,
        **kwargs,
    ) -> None:
        super().__init__(*args, token_loss=False, **kwargs)
        self.adapters = list(adapters)
        self.index = {name: i for i, name in enumerate(self.adapters)}
        self.epoch_examples = dict(epoch_examples)
        self.schedules = dict(schedules)
        self.adapter_max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self.adapter_optimizer: AdapterAdamW | None = None
        self.add_callback(_EndEpoch(self))
        #: One entry per evaluation: ``{"step", "prefix", "accuracy": {adapter: value}, "loss": {adapter: value}}``.
        self.evaluations: list[dict] = []

    # ------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            world = args.world_size
            lambdas: dict[tuple[int, int], object] = {}

            def lambda_for(warmup: int, steps: int):
                if (warmup, steps) not in lambdas:  # Trainer's schedule, over the adapter's own steps
                    scheduler = get_scheduler(
                        args.lr_scheduler_type,
                        optimizer=_display_optimizer(1.0),
                        num_warmup_steps=warmup,
                        num_training_steps=steps,
                        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
                    )
                    lambdas[warmup, steps] = scheduler.lr_lambdas[0]
                return lambdas[warmup, steps]

            schedules = {name: lambda_for(*self.schedules[name][1:]) for name in self.adapters}
            self.adapter_optimizer = AdapterAdamW(
                model if model is not None else self.model,
                self.adapters,
                lr={name: self.schedules[name][0] for name in self.adapters},
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
                batch_size=args.per_device_train_batch_size * world,
                epoch_examples=self.epoch_examples,
                lr_lambda=lambda name, step: schedules[name](step),
                max_grad_norm=self.adapter_max_grad_norm,
                total_steps=self.total_steps,
            )
            self.optimizer = self.adapter_optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule over the run's steps from the highest adapter peak, for its logs only (the table's
        learning-rate column and the plot): each adapter follows its own."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=_display_optimizer(max(lr for lr, _, _ in self.schedules.values())),
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        """Each adapter's examples in runs of the (global) batch size: each adapter steps on one batch of its own."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        batch = self.args.per_device_train_batch_size * self.args.world_size
        return AdapterBatchSampler([example["adapter_name"] for example in dataset], batch, seed=self.args.seed)

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # Trainer's would visit every adapter's parameters at every step; clipping is per adapter

    # ----------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        names = inputs.pop("adapter_names")
        outputs = model(**inputs, adapter_names=names)
        loss = adapter_cross_entropy(outputs.logits, labels, scale=self.args.per_device_train_batch_size)
        if model.training and self.adapter_optimizer is not None:
            self.adapter_optimizer.add_batch(names)
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------- checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        for name in self.adapters:
            load_into_adapter(model, os.path.join(resume_from_checkpoint, name), name)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Each adapter's loss and accuracy on its held-out examples (kept in `evaluations`); returns and logs
        ``<prefix>_loss`` (over all examples), ``<prefix>_accuracy`` (the mean over adapters) and
        ``<prefix>_accuracy_min``. In a distributed run each process scores its share of the examples."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        device = self.args.device
        count = len(self.adapters)
        sums = torch.zeros(3, count, dtype=torch.float64, device=device)  # loss, correct, examples
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(dataset), world))
        batch_size = self.args.per_device_eval_batch_size
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(mine), batch_size):
                    batch = self.data_collator([dataset[i] for i in mine[start : start + batch_size]])
                    labels = batch.pop("labels").to(device)
                    names = batch.pop("adapter_names")
                    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                    logits = model(**inputs, adapter_names=names).logits.float()
                    index = torch.tensor([self.index[n] for n in names], device=device)
                    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
                    right = (logits.argmax(-1) == labels).double()
                    sums[0].index_add_(0, index, losses)
                    sums[1].index_add_(0, index, right)
                    sums[2].index_add_(0, index, torch.ones_like(losses))
        finally:
            model.train(was_training)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        loss, correct, examples = sums.cpu().tolist()
        scored = [i for i in range(count) if examples[i]]
        accuracy = {self.adapters[i]: correct[i] / examples[i] for i in scored}
        per_loss = {self.adapters[i]: loss[i] / examples[i] for i in scored}
        self.evaluations.append(
            {"step": self.state.global_step, "prefix": metric_key_prefix, "accuracy": accuracy, "loss": per_loss}
        )
        metrics = {
            f"{metric_key_prefix}_loss": sum(loss) / max(1.0, sum(examples)),
            f"{metric_key_prefix}_accuracy": sum(accuracy.values()) / max(1, len(accuracy)),
            f"{metric_key_prefix}_accuracy_min": min(accuracy.values(), default=float("nan")),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class _EndEpoch(TrainerCallback):
    """Tells the optimizer where each epoch of the data ends (`AdapterAdamW.end_epoch`)."""

    def __init__(self, trainer: MultiAdapterTrainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.adapter_optimizer is not None:
            self.trainer.adapter_optimizer.end_epoch()


def _display_optimizer(lr: float) -> torch.optim.Optimizer:
    """An optimizer of one unused tensor: what a learning-rate scheduler needs to compute its schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    optimizer._opt_called = True  # never stepped: torch would warn that the schedule steps before it
    return optimizer
