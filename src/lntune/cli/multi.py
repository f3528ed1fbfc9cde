"""``lntune train --adapter-column COLUMN``: one adapter per value of a column, all trained in one run.

Every example runs through its own value's adapter in mixed batches (`lntune.collators.AdapterCollator`);
each adapter has its own label set and classifier head (heads of every size share each batch), and
steps as its own run would (`lntune.AdapterAdamW` with the run's batch size, schedule and clipping). The
output folder holds one PEFT adapter folder per value, ``DIR/<value>/``, each with its own
``lntune_run.json`` and ``metrics.json``, so ``lntune serve --adapters DIR`` serves them all; ``DIR``
itself holds a summary (``metrics.json``) and the plot. ``DIR`` is one output folder with the rules of a
single run: the lock, the work folder, ``--overwrite``, Ctrl-C and ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lntune.cli.common import CLIError, is_main_process, say, world_size
from lntune.cli.data import tokenize
from lntune.cli.multi_data import AdapterData, mapped_folders, read_adapter_data
from lntune.cli.output import CHECKPOINTS, METRICS_FILE, PLOT_FILE, OutputFolder
from lntune.cli.train import (
    _training_arguments,
    as_before_metrics,
    learning_rate,
    run_in_output,
    run_record,
    run_train,
    train_to_end,
    tuning_model,
    warmup_steps,
)
from lntune.loading import model_id
from lntune.run_record import RUN_FILE
from lntune.tasks import task_named

#: How many of the worst adapters the end of a run lists.
WORST_SHOWN = 5


def run_train_command(args: argparse.Namespace, callbacks: list | None = None) -> dict:
    """``lntune train``: one adapter (`lntune.cli.train.run_train`), or one per value with ``--adapter-column``."""
    if getattr(args, "adapter_column", None):
        return run_multi_train(args, callbacks)
    if getattr(args, "skip_bad_adapters", False):
        raise CLIError("--skip-bad-adapters needs --adapter-column (it leaves out values of that column).")
    return run_train(args, callbacks)


def run_multi_train(args: argparse.Namespace, callbacks: list | None = None) -> dict:
    """Train one adapter per value of ``--adapter-column`` in one run, and return the summary metrics.

    Everything is checked before anything is written (a value that cannot be trained ends the command with
    one line, unless ``--skip-bad-adapters``). The run works in a hidden folder next to ``--output`` and
    renames it at the end; Ctrl-C saves a checkpoint there, for ``--resume``.

    Args:
        args: Parsed ``lntune train`` options, with ``adapter_column``.
        callbacks: Extra ``TrainerCallback`` objects.

    Returns:
        The summary written to ``DIR/metrics.json`` (``per_adapter`` holds each value's metrics).

    Raises:
        CLIError: Bad input (nothing written).
        Interrupted: Ctrl-C; its message says what was kept and how to resume.

    Example:
        >>> run_multi_train(build_parser().parse_args(["train", "--data", "d.csv", "--adapter-column", "task"]))
        {'adapters': 3, 'eval_accuracy': 0.84, ...}
    """
    if not task_named(args.task).classifies:
        raise CLIError("--adapter-column trains classifiers, one head per value: use it with --task seq-cls.")
    return run_in_output(args, _train, callbacks)


@dataclass
class _Prepared:
    """The model and data of a many-adapter run, checked and tokenized."""

    model: nn.Module
    tokenizer: object
    adapters: list[AdapterData]
    train_set: list
    eval_set: list
    max_length: int
    left_out: list[str]
    eval_source: str


def _prepare(args: argparse.Namespace, model_path: str) -> _Prepared:
    """Read and check the data, load the model, add one adapter (and head) per value, tokenize."""
    adapters, left_out, eval_source = read_adapter_data(args)  # first: bad data fails before the slow imports
    sizes = [len(a.labels) for a in adapters]
    first = adapters[0].name
    task, model, tokenizer, max_length = tuning_model(args, model_path, num_labels=sizes[0], adapter_name=first)

    from lntune import LNTuningConfig

    config = LNTuningConfig(task_type=task.task_type, target_modules=args.target_modules)
    model.add_adapters([a.name for a in adapters[1:]], config, num_labels=sizes[1:])
    train_set, eval_set = [], []
    for adapter in adapters:
        for rows, out in ((adapter.train, train_set), (adapter.held_out, eval_set)):
            examples = tokenize(rows, tokenizer, args.text_column, max_length, args.label_column, adapter.labels)
            out.extend({**example, "adapter_name": adapter.name} for example in examples)
    return _Prepared(model, tokenizer, adapters, train_set, eval_set, max_length, left_out, eval_source)


def _schedules(args, adapters: list[AdapterData], total_steps: int) -> dict[str, tuple[float, int, int]]:
    """Each adapter's ``(peak learning rate, warm-up steps, steps)``: what ``lntune train`` would choose for a run
    of that adapter alone with the same options (`learning_rate` and `warmup_steps` of its own number of
    steps), so that defaults that depend on a run's length follow each adapter's."""
    from lntune.multi_adapter import adapter_steps_planned

    batch = args.batch_size * world_size()
    epochs = args.epochs
    if args.max_steps:  # the share of the data the run covers, as epochs
        epochs = total_steps * batch / sum(len(a.train) for a in adapters)
    out = {}
    for adapter in adapters:
        steps = adapter_steps_planned(len(adapter.train), batch, epochs)
        out[adapter.name] = (learning_rate(args, steps), warmup_steps(steps), steps)
    return out


def _make_trainer(args, run: _Prepared, work: Path, total_steps: int, callbacks: list):
    from transformers import DataCollatorWithPadding

    from lntune.cli.multi_trainer import MultiAdapterTrainer
    from lntune.cli.progress import EvalLines
    from lntune.collators import AdapterCollator

    training = _training_arguments(args, work, total_steps)
    if training.n_gpu > 1:  # Trainer would wrap the model in DataParallel, which cannot split adapter_names
        raise CLIError(
            f"--adapter-column: {training.n_gpu} GPUs in one process; run one process per GPU with "
            f"torchrun --nproc-per-node {training.n_gpu} (or show one GPU: CUDA_VISIBLE_DEVICES=0)."
        )
    max_grad_norm = training.max_grad_norm or None
    training.max_grad_norm = 0.0  # each adapter's gradient is clipped on its own (AdapterAdamW)
    training.ddp_find_unused_parameters = True  # a batch trains a few of the adapters
    return MultiAdapterTrainer(
        model=run.model,
        args=training,
        train_dataset=run.train_set,
        eval_dataset=run.eval_set,
        data_collator=AdapterCollator(DataCollatorWithPadding(run.tokenizer)),
        callbacks=[EvalLines(total_steps), *callbacks],
        adapters=[a.name for a in run.adapters],
        epoch_examples={a.name: len(a.train) for a in run.adapters},
        schedules=_schedules(args, run.adapters, total_steps),
        max_grad_norm=max_grad_norm,
        total_steps=total_steps,
    )


def _train(args, model_path: str, settings: dict, kept: dict | None, output: OutputFolder, callbacks) -> dict:
    from lntune.cli.interrupt import StopOnInterrupt
    from lntune.cli.trainer import schedule_steps

    run = _prepare(args, model_path)
    if kept is None:
        output.create_work("train", settings)
    total_steps = schedule_steps(len(run.train_set), args.batch_size, args.epochs, args.max_steps or -1)
    stop = StopOnInterrupt()
    trainer = _make_trainer(args, run, output.work, total_steps, [stop, *(callbacks or [])])
    _announce(args, model_path, run, total_steps, trainer.schedules)
    if kept is None:
        before = trainer.evaluate(metric_key_prefix="before")
        before_adapters = trainer.evaluations[-1]
        output.save_state({"command": "train", "settings": settings, "before": before, "adapters": before_adapters})
    else:
        before, before_adapters = kept.get("before", {}), kept.get("adapters", {})
    result, after = train_to_end(trainer, stop, args, output, resumed=kept is not None)
    metrics = _summary(args, run, trainer, result, before, before_adapters, after)
    if is_main_process():
        _finish(trainer, args, model_path, run, metrics, output)
    _wait_for_every_process()  # every process ends when the output is published
    return metrics


def _wait_for_every_process() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rates(schedules: dict[str, tuple[float, int, int]]) -> str:
    """The peak learning rates of a run's adapters, as said in its first line and plot: ``0.01``, or
    ``0.005 to 0.01`` when defaults that follow each adapter's run length differ."""
    rates = sorted({lr for lr, _, _ in schedules.values()})
    return f"{rates[0]:.3g}" if len(rates) == 1 else f"{rates[0]:.3g} to {rates[-1]:.3g}"


def _announce(args, model_path: str, run: _Prepared, total_steps: int, schedules: dict) -> None:
    sizes = sorted({len(a.labels) for a in run.adapters})
    classes = f"{sizes[0]} classes" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]} classes"
    per_adapter = _adapter_sizes(run.model, run.adapters)
    _, total = run.model.get_nb_trainable_parameters()
    say(
        f"lntune: LN tuning {model_id(model_path)} ({args.task}) for {len(run.adapters):,d} adapters (column "
        f"{args.adapter_column!r}, {classes}) on {len(run.train_set):,d} examples, {len(run.eval_set):,d} held out; "
        f"{statistics.median(per_adapter.values()):,.0f} trainable parameters per adapter "
        f"({sum(per_adapter.values()):,d} in all, of {total:,d}), {total_steps} steps at lr {_rates(schedules)}"
    )
    mapped = mapped_folders(run.adapters)
    if mapped:
        shown = ", ".join(f"{a.value!r} -> {a.folder}" for a in mapped[:3])
        more = f", and {len(mapped) - 3} more" if len(mapped) > 3 else ""
        what = (
            "value is not a safe folder name; its folder"
            if len(mapped) == 1
            else "values are not safe folder names; their folders"
        )
        say(f"lntune: {len(mapped)} {what}: {shown}{more}")
    if run.left_out:
        shown = ", ".join(run.left_out[:5]) + (f", and {len(run.left_out) - 5} more" if len(run.left_out) > 5 else "")
        values = "value" if len(run.left_out) == 1 else "values"
        say(f"lntune: left out {len(run.left_out)} {values} (--skip-bad-adapters): {shown}")


def _adapter_sizes(model, adapters: list[AdapterData]) -> dict[str, int]:
    from lntune.multi_adapter import adapter_parameters

    params = adapter_parameters(model, [a.name for a in adapters])
    return {name: sum(p.numel() for p in group) for name, group in params.items()}


def _summary(args, run: _Prepared, trainer, result, before: dict, before_adapters: dict, after: dict) -> dict:
    """The run's metrics: overall numbers, and each value's (``per_adapter``)."""
    last = trainer.evaluations[-1]
    steps = trainer.adapter_optimizer.adapter_steps()
    sizes = _adapter_sizes(run.model, run.adapters)
    per_adapter = {}
    for adapter in run.adapters:
        name = adapter.name
        per_adapter[adapter.value] = {
            "folder": adapter.folder,
            "eval_accuracy": last["accuracy"][name],
            "eval_loss": last["loss"][name],
            "eval_accuracy_before": before_adapters.get("accuracy", {}).get(name),
            "eval_loss_before": before_adapters.get("loss", {}).get(name),
            "num_labels": len(adapter.labels),
            "num_train_examples": len(adapter.train),
            "num_eval_examples": len(adapter.held_out),
            "train_steps": steps.get(name, 0),
            "learning_rate": trainer.schedules[name][0],
            "trainable_params": sizes[name],
        }
    accuracy = [m["eval_accuracy"] for m in per_adapter.values()]
    worst = sorted(per_adapter, key=lambda v: (per_adapter[v]["eval_accuracy"], v))[:WORST_SHOWN]
    return {
        "adapters": len(run.adapters),
        "adapter_column": args.adapter_column,
        **{k: v for k, v in after.items() if k.startswith("eval_")},
        **as_before_metrics(before),
        "eval_accuracy_median": statistics.median(accuracy),
        "train_loss": result.training_loss,
        "train_runtime": result.metrics["train_runtime"],
        "train_steps": result.global_step,
        "world_size": trainer.args.world_size,
        "trainable_params": sum(sizes.values()),
        "all_params": run.model.get_nb_trainable_parameters()[1],
        "learning_rate": args.lr,  # None: each adapter's own, in per_adapter
        "num_train_examples": len(run.train_set),
        "num_eval_examples": len(run.eval_set),
        "held_out": run.eval_source,
        "left_out": run.left_out,
        "worst": worst,
        "per_adapter": per_adapter,
    }


def _finish(trainer, args, model_path: str, run: _Prepared, metrics: dict, output: OutputFolder) -> None:
    """Write one adapter folder per value, the summary and the plot, publish, and print the end (rank 0)."""
    from lntune.cli.plot import plot_adapters

    work = output.work
    for adapter in run.adapters:
        folder = work / adapter.folder
        save_adapter(run.model, adapter.name, folder)
        mine = metrics["per_adapter"][adapter.value]
        history = [
            {
                "step": e["step"],
                "eval_accuracy": e["accuracy"].get(adapter.name),
                "eval_loss": e["loss"].get(adapter.name),
            }
            for e in trainer.evaluations
        ]
        adapter_metrics = {
            **{k: v for k, v in mine.items() if k != "folder"},
            "eval_history": history,
            "adapter_column": args.adapter_column,
            "adapter_value": adapter.value,
        }
        (folder / METRICS_FILE).write_text(json.dumps(adapter_metrics, indent=2) + "\n", encoding="utf-8")
        extra = {"adapter_column": args.adapter_column, "adapter_value": adapter.value}
        record = run_record(args, model_path, run.max_length, labels=adapter.labels, extra=extra)
        record.files = sorted({entry.name for entry in folder.iterdir()} | {RUN_FILE})
        record.write(folder)
    (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    history = trainer.state.log_history
    if "eval_loss_before" in metrics:
        before = {"before_loss": metrics["eval_loss_before"], "before_accuracy": metrics.get("eval_accuracy_before")}
        history = [{"step": 0, **before}, *history]
    per = metrics["per_adapter"].values()
    title = (
        f"LN tuning of {model_id(model_path)}: {len(run.adapters)} adapters (column {args.adapter_column!r}) on "
        f"{Path(args.data).name}, lr {_rates(trainer.schedules)}, batch {args.batch_size}, "
        f"{metrics['train_steps']} steps"
    )
    plot_adapters(
        history,
        [m["eval_accuracy_before"] for m in per if m["eval_accuracy_before"] is not None],
        [m["eval_accuracy"] for m in per],
        work / PLOT_FILE,
        title,
    )
    shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)  # last: until here, Ctrl-C leaves one to resume from
    adapters = {a.value: a.folder for a in run.adapters}
    summary = run_record(
        args, model_path, run.max_length, extra={"adapter_column": args.adapter_column, "adapters": adapters}
    )
    output.publish(RUN_FILE, summary.to_dict())
    _print_end(metrics, output.path)


def _print_end(metrics: dict, path: Path) -> None:
    per = metrics["per_adapter"]
    rows = [(value, per[value]) for value in metrics["worst"]]
    width = max(len("adapter"), *(len(v) for v, _ in rows))
    say(f"lntune: the {len(rows)} adapters with the lowest held-out accuracy:")
    say(f"  {'adapter':<{width}}  before  after  held out  classes")
    for value, m in rows:
        before = "-" if m["eval_accuracy_before"] is None else f"{m['eval_accuracy_before']:.3f}"
        say(
            f"  {value:<{width}}  {before:>6}  {m['eval_accuracy']:.3f}  {m['num_eval_examples']:>8,d}  "
            f"{m['num_labels']:>7d}"
        )
    worst, before = metrics["worst"][0], metrics.get("eval_accuracy_before", float("nan"))
    say(
        f"lntune: {metrics['adapters']:,d} adapters: mean held-out accuracy {before:.4f} "
        f"-> {metrics['eval_accuracy']:.4f} (median {metrics['eval_accuracy_median']:.4f}, lowest "
        f"{per[worst]['eval_accuracy']:.4f}: {worst!r}); adapters, metrics.json and plot written to {path}"
    )


def save_adapter(model, adapter_name: str, folder: Path) -> None:
    """Write ``adapter_name`` as a PEFT adapter folder of its own (config, weights, model card) in ``folder``."""
    from lntune.checkpoint import get_peft_model_state_dict, serialize_adapter_weights, write_adapter_weights

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    file_name, data = serialize_adapter_weights(state, True)
    write_adapter_weights(str(folder), file_name, data)
    dataclasses.replace(model.peft_config[adapter_name], inference_mode=True).save_pretrained(str(folder))
    model.create_or_update_model_card(str(folder))
