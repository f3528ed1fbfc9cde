"""``lntune train``: LN tuning on `transformers.Trainer`, writing the adapter, metrics and a plot."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lntune.cli.arguments import positive_float, positive_int, seed
from lntune.cli.common import CLIError, Interrupted, is_main_process, plural, say, use_cpu
from lntune.cli.data import (
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    bundled_file,
    check_columns,
    check_eval_labels,
    check_train_labels,
    hold_out,
    label_names,
    load_table,
    tokenize,
)
from lntune.cli.output import CHECKPOINTS, METRICS_FILE, PLOT_FILE, OutputFolder
from lntune.loading import load_model, load_tokenizer, max_tokens, model_id, packaged_model_path, set_pad_token
from lntune.run_record import RUN_FILE, RunRecord
from lntune.tasks import TRAINABLE_TASKS, Task, task_named

#: Defaults chosen by benchmarks/sweep_lr.py and sweep_defaults.py (see docs/cli.md): LN tuning needs a
#: large learning rate; without ``--lr`` it comes from the run's length (`default_learning_rate`).
DEFAULT_EPOCHS = 2.0
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 128
DEFAULT_WARMUP = 0.1
DEFAULT_SCHEDULE = "linear"
DEFAULT_OUTPUT = "lntune-output"


#: `default_learning_rate`: the peak rate of runs up to ``LR_SHORT_STEPS`` optimizer steps, and of runs of
#: ``2 * LR_SHORT_STEPS`` steps and more; in between, ``LR_SHORT * LR_SHORT_STEPS / steps`` (see docs/cli.md).
LR_SHORT, LR_LONG, LR_SHORT_STEPS = 1e-2, 5e-3, 50
LR_HELP = (
    f"{LR_SHORT:g} up to {LR_SHORT_STEPS} steps, {LR_LONG:g} from {2 * LR_SHORT_STEPS}, "
    f"in between {LR_SHORT * LR_SHORT_STEPS:g} / steps"
)


def default_learning_rate(total_steps: int) -> float:
    """The peak learning rate of a run of ``total_steps`` optimizer steps when ``--lr`` is not given.

    From benchmarks/sweep_defaults.py (MiniLM, the bundled tasks, 24 to 250 steps): 1e-2 was the best rate
    at 50 steps on every task, and 5e-3 the best or within half a point of it from 100 steps on, where it
    stays further from the rates that collapse a run to one class (2e-2 did at 126 steps; 3e-2 and more
    did on every run of up to 100 steps). It depends only on the run's total steps, so adapters trained in
    one run with one optimizer can share it.

    Example:
        >>> [default_learning_rate(steps) for steps in (1, 50, 80, 100, 250)]
        [0.01, 0.01, 0.00625, 0.005, 0.005]
    """
    return min(LR_SHORT, max(LR_LONG, LR_SHORT * LR_SHORT_STEPS / max(1, total_steps)))


def warmup_steps(total_steps: int) -> int:
    """Linear warm-up steps: 10% of the run rounded down, so none below 10 steps.

    Transformers' warm-up trains its first step at lr 0; rounded up, as before, a run of up to 10 steps
    spent a whole step (``--max-steps 1``: all of it) at lr 0.
    """
    return math.floor(DEFAULT_WARMUP * total_steps)


def learning_rate(args: argparse.Namespace, total_steps: int) -> float:
    """The run's peak learning rate: ``--lr`` if given, else `default_learning_rate` of its steps."""
    return args.lr if args.lr is not None else default_learning_rate(total_steps)


#: The options that define a run: ``--resume`` must repeat them.
_RUN_OPTIONS = (
    "model",
    "data",
    "eval_data",
    "text_column",
    "label_column",
    "task",
    "epochs",
    "lr",
    "batch_size",
    "max_length",
    "max_steps",
    "seed",
    "target_modules",
    "adapter_column",
    "skip_bad_adapters",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lntune train``."""
    parser.add_argument(
        "--model", metavar="PATH", help="local Transformers model folder (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--data", metavar="FILE", help="training data: .csv, .json or .jsonl (default: bundled movie reviews)"
    )
    parser.add_argument(
        "--eval-data", metavar="FILE", help="held-out data (default: bundled test split, or 10%% of --data)"
    )
    parser.add_argument("--text-column", metavar="NAME", default="text", help="column with the text (default: text)")
    parser.add_argument(
        "--label-column", metavar="NAME", default="label", help="column with the label (default: label)"
    )
    parser.add_argument("--task", choices=TRAINABLE_TASKS, default="seq-cls", help="default: seq-cls")
    parser.add_argument(
        "--output", metavar="DIR", default=DEFAULT_OUTPUT, help=f"adapter folder to write (default: {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier lntune result in --output (nothing else)"
    )
    parser.add_argument("--epochs", type=positive_float, default=DEFAULT_EPOCHS, help=f"default: {DEFAULT_EPOCHS:g}")
    parser.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {LR_HELP})")
    batch_help = f"per process (default: {DEFAULT_BATCH_SIZE})"
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help=batch_help)
    parser.add_argument(
        "--max-length",
        type=positive_int,
        help=f"tokens per text, at most the model's limit (default: {DEFAULT_MAX_LENGTH}, or the limit if smaller)",
    )
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--seed", type=seed, default=42, help="default: 42")
    parser.add_argument(
        "--target-modules", nargs="+", metavar="NAME", help="modules to tune (default: the model type's norms)"
    )
    parser.add_argument(
        "--adapter-column",
        metavar="COLUMN",
        help="train one adapter per value of this column of --data, all in one run (output: DIR/<value>/)",
    )
    parser.add_argument(
        "--skip-bad-adapters",
        action="store_true",
        help="with --adapter-column: leave out values that cannot be trained (one class, too few examples)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from --model")


def _settings(args: argparse.Namespace, model_path: str) -> dict:
    """The options that define the run, with paths made absolute (what ``--resume`` must repeat)."""
    settings = {name: getattr(args, name) for name in _RUN_OPTIONS}
    settings["model"] = os.path.abspath(model_path)
    for name in ("data", "eval_data"):
        if settings[name]:
            settings[name] = os.path.abspath(settings[name])
    return settings


def _check_same_run(kept: dict, settings: dict) -> None:
    for name, value in settings.items():
        if kept.get(name, value) != value:
            flag = "--" + name.replace("_", "-")
            raise CLIError(
                f"--resume: the interrupted run was started with {_option(flag, kept[name])}, this one with "
                f"{_option(flag, value)}; resume with the same options."
            )


def _option(flag: str, value) -> str:
    """How an option was given, as typed: ``--max-steps 5``, ``--target-modules a b``, or ``no --max-steps``."""
    if value is None or value is False:
        return f"no {flag}"
    if isinstance(value, (list, tuple)):
        return shlex.join([flag, *map(str, value)])
    return shlex.join([flag, f"{value:g}" if isinstance(value, float) else str(value)])


def _read_data(args: argparse.Namespace) -> tuple[list, list, list[str]]:
    """Train and eval tables, checked, and the label names (empty for causal-lm)."""
    if args.eval_data and not args.data:
        raise CLIError("--eval-data needs --data (the bundled dataset has its own test split).")
    classifies = task_named(args.task).classifies
    if classifies and args.text_column == args.label_column:
        raise CLIError(f"--text-column and --label-column are both {args.text_column!r}; name two columns.")
    train_path = args.data or bundled_file(DEFAULT_TRAIN)
    eval_path = args.eval_data or (None if args.data else bundled_file(DEFAULT_EVAL))
    label_column = args.label_column if classifies else None
    train = load_table(train_path, "--data")
    check_columns(train, train_path, "--data", args.text_column, label_column)
    if eval_path:
        evaluation = load_table(eval_path, "--eval-data")
        check_columns(evaluation, eval_path, "--eval-data", args.text_column, label_column)
    else:
        if len(train) < 2:
            raise CLIError(f"--data {train_path}: 1 example is too few to hold out an eval set; pass --eval-data.")
        train, evaluation = hold_out(train, 0.1, args.seed)
        eval_path = f"{train_path} (10% held out)"
    labels: list[str] = []
    if label_column:
        labels = label_names([row[label_column] for row in train])
        check_train_labels(labels, label_column, train_path)
        check_eval_labels(labels, [row[label_column] for row in evaluation], eval_path)
    return train, evaluation, labels


def _max_length(args: argparse.Namespace, model_path: str, tokenizer) -> int:
    """``--max-length``, checked against the model's limit (the default shrinks to fit it)."""
    limit = max_tokens(model_path, tokenizer, args.trust_remote_code)
    if args.max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if limit is not None and args.max_length > limit:
        raise CLIError(
            f"--max-length {args.max_length}: the model takes at most {limit} tokens per text; "
            f"pass --max-length {limit} or less."
        )
    return args.max_length


def _training_arguments(args: argparse.Namespace, work: Path, total_steps: int):
    from transformers import TrainingArguments

    from lntune.cli.progress import wants_progress_bar

    eval_every = math.ceil(total_steps / 4)  # the fourth evaluation falls on the last step
    return TrainingArguments(
        output_dir=str(work / CHECKPOINTS),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        learning_rate=learning_rate(args, total_steps),
        lr_scheduler_type=DEFAULT_SCHEDULE,
        warmup_steps=warmup_steps(total_steps),  # a step count: Transformers 4.x takes no ratio here
        weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        logging_steps=max(1, total_steps // 100),  # for the plot; nothing is printed per log
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=eval_every,
        save_total_limit=1,
        seed=args.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=use_cpu(),
        ddp_find_unused_parameters=False,
        prediction_loss_only=not task_named(args.task).classifies,
        disable_tqdm=not wants_progress_bar(),  # set explicitly: Transformers hides it at log level "error"
        log_level="error",
        log_level_replica="error",
    )


def _last_checkpoint(work: Path) -> Path | None:
    checkpoints = sorted((work / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return checkpoints[-1] if checkpoints else None


def _resume_command(args: argparse.Namespace) -> str:
    words = list(getattr(args, "argv", None) or ["train"])
    return shlex.join(["lntune", *words, *([] if "--resume" in words else ["--resume"])])


def run_train(args: argparse.Namespace, callbacks: list | None = None) -> dict:
    """Train an LN tuning adapter as ``lntune train`` does and return its metrics.

    Everything is checked before anything is written. The run works in a hidden folder next to
    ``--output`` and renames it at the end; Ctrl-C saves a checkpoint there, for ``--resume``.

    Args:
        args: Parsed ``lntune train`` options.
        callbacks: Extra ``TrainerCallback`` objects.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        CLIError: Bad input (nothing written).
        Interrupted: Ctrl-C; its message says what was kept and how to resume.

    Example:
        >>> run_train(build_parser().parse_args(["train", "--max-steps", "10"]))["eval_accuracy"]
        0.71
    """
    return run_in_output(args, _train, callbacks)


def run_in_output(args: argparse.Namespace, train: Callable[..., dict], callbacks: list | None) -> dict:
    """Run a training function in ``--output``'s work folder, as every ``lntune train`` run does.

    Takes the folder's lock, checks ``--resume`` against the interrupted run's settings, and calls
    ``train(args, model_path, settings, kept, output, callbacks)`` (``kept``: the interrupted run's saved
    state, or None). A failure before any checkpoint discards the work folder (only one this run created);
    Ctrl-C becomes `Interrupted`, whose message says how to resume.

    Args:
        args: Parsed ``lntune train`` options.
        train: The run (`_train` here, or the ``--adapter-column`` one).
        callbacks: Extra ``TrainerCallback`` objects, passed on.

    Returns:
        What ``train`` returns: the run's metrics.
    """
    with OutputFolder(args.output, overwrite=args.overwrite) as output:
        model_path = args.model or packaged_model_path()
        settings = _settings(args, model_path)
        kept = output.check_work("train", resume=args.resume)
        if args.resume:
            _check_same_run(kept.get("settings", {}), settings)
            if _last_checkpoint(output.work) is None:
                raise CLIError(f"--resume: no checkpoint in {output.work}; start without --resume.")
        try:
            return train(args, model_path, settings, kept, output, callbacks)
        except BaseException as exc:
            if _last_checkpoint(output.work) is None:
                output.discard_work()  # only one this run created: nothing in it could be resumed
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(_interrupted(args, output, None)) from None
            raise


def _interrupted(args: argparse.Namespace, output: OutputFolder, total_steps: int | None) -> str:
    """What an interrupted run kept, and how to resume it, as one line."""
    checkpoint = _last_checkpoint(output.work)
    if checkpoint is None:
        return "interrupted before the first checkpoint; nothing was kept."
    step = checkpoint.name.rsplit("-", 1)[1]
    of = f" of {total_steps}" if total_steps else ""
    command = _resume_command(args)
    return f"interrupted; the checkpoint of step {step}{of} is kept in {output.work}; resume with: {command}"


@dataclass
class _Prepared:
    """The model and data of a run, checked and tokenized."""

    task: Task
    model: nn.Module
    tokenizer: object
    train_set: list
    eval_set: list
    labels: list[str]
    max_length: int


def tuning_model(
    args: argparse.Namespace,
    model_path: str,
    labels: list[str] | None = None,
    num_labels: int | None = None,
    adapter_name: str = "default",
) -> tuple[Task, nn.Module, object, int]:
    """The base model of a training run, wrapped for LN tuning with its first adapter, and its tokenizer.

    Args:
        args: The parsed ``lntune train`` options (model, task, seed, ``--max-length``, ``--target-modules``).
        model_path: The local model folder.
        labels: Classification: the label names in id order (the head's size and names).
        num_labels: Classification without ``labels``: the first adapter's head size.
        adapter_name: The first adapter's name.

    Returns:
        ``(task, model, tokenizer, max_length)``: the model in train mode, seeded with ``--seed``.
    """
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    max_length = _max_length(args, model_path, tokenizer)

    from transformers import set_seed

    from lntune import LNTuningConfig, get_peft_model

    set_seed(args.seed)
    task = task_named(args.task)
    loaded = load_model(model_path, task, labels, num_labels, trust_remote_code=args.trust_remote_code)
    model = loaded.model.train()
    set_pad_token(model, tokenizer.pad_token_id)
    config = LNTuningConfig(task_type=task.task_type, target_modules=args.target_modules)
    try:
        model = get_peft_model(model, config, adapter_name)
    except ValueError as exc:
        raise CLIError(f"--target-modules: {exc}") from None
    return task, model, tokenizer, max_length


def _prepare(args: argparse.Namespace, model_path: str) -> _Prepared:
    """Read and check the data, load the model and tokenizer, wrap the model for LN tuning, tokenize."""
    train_table, eval_table, labels = _read_data(args)  # first: bad data fails before the slow imports
    task, model, tokenizer, max_length = tuning_model(args, model_path, labels=labels)
    label_column = args.label_column if task.classifies else None
    train_set = tokenize(train_table, tokenizer, args.text_column, max_length, label_column, labels)
    eval_set = tokenize(eval_table, tokenizer, args.text_column, max_length, label_column, labels)
    return _Prepared(task, model, tokenizer, train_set, eval_set, labels, max_length)


def _make_trainer(
    args: argparse.Namespace, run: _Prepared, work: Path, total_steps: int, callbacks: list, before: dict | None
):
    """The `AdapterTrainer` of a run, with the task's collator and metrics and lntune's callbacks (``before``: a
    resumed run's evaluation before training, shown first)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    from lntune.cli.progress import EvalLines
    from lntune.cli.trainer import AdapterTrainer, accuracy

    if run.task.classifies:
        collator, metrics_fn = DataCollatorWithPadding(run.tokenizer), accuracy
    else:
        collator, metrics_fn = DataCollatorForLanguageModeling(run.tokenizer, mlm=False), None
    return AdapterTrainer(
        model=run.model,
        args=_training_arguments(args, work, total_steps),
        train_dataset=run.train_set,
        eval_dataset=run.eval_set,
        data_collator=collator,
        compute_metrics=metrics_fn,
        callbacks=[EvalLines(total_steps, before), *callbacks],
        token_loss=not run.task.classifies,
    )


def _train(args, model_path: str, settings: dict, kept: dict | None, output: OutputFolder, callbacks) -> dict:
    from lntune.cli.interrupt import StopOnInterrupt
    from lntune.cli.trainer import schedule_steps

    run = _prepare(args, model_path)
    if kept is None:
        output.create_work("train", settings)
    total_steps = schedule_steps(len(run.train_set), args.batch_size, args.epochs, args.max_steps or -1)
    stop = StopOnInterrupt()
    before = kept.get("before") if kept is not None else None
    trainer = _make_trainer(args, run, output.work, total_steps, [stop, *(callbacks or [])], before)
    trainable, total = run.model.get_nb_trainable_parameters()
    name = model_id(model_path)
    say(
        f"lntune: LN tuning {name} ({args.task}) on {len(run.train_set)} examples, {len(run.eval_set)} held out; "
        f"{trainable:,d} of {total:,d} parameters trainable ({100 * trainable / total:.3f}%), "
        f"{plural(total_steps, 'step')} at lr {learning_rate(args, total_steps):.3g}"
    )
    if kept is None:
        before = trainer.evaluate(metric_key_prefix="before")
        output.save_state({"command": "train", "settings": settings, "before": before})
    else:
        before = kept.get("before", {})
    result, after = train_to_end(trainer, stop, args, output, resumed=kept is not None)
    metrics = {
        **{k: v for k, v in after.items() if k.startswith("eval_")},
        **as_before_metrics(before),
        "train_loss": result.training_loss,
        "train_runtime": result.metrics["train_runtime"],
        "train_steps": result.global_step,
        "world_size": trainer.args.world_size,
        "trainable_params": trainable,
        "all_params": total,
        "learning_rate": learning_rate(args, total_steps),
        "num_train_examples": len(run.train_set),
        "num_eval_examples": len(run.eval_set),
    }
    if is_main_process():
        _finish(trainer, args, name, model_path, run, metrics, output)
    return metrics


def _finish(trainer, args, name: str, model_path: str, run: _Prepared, metrics: dict, output: OutputFolder) -> None:
    """Write the run's files, publish the output folder and print the one-line summary (rank 0)."""
    record = run_record(args, model_path, run.max_length, labels=run.labels)
    _write_outputs(trainer, run.model, args, name, record, metrics, output)
    summary = f"eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}"
    if "eval_accuracy" in metrics:
        accuracy = f"held-out accuracy {metrics['eval_accuracy_before']:.4f} -> {metrics['eval_accuracy']:.4f}"
        summary = f"{accuracy}, {summary}"
    say(f"lntune: {summary}; adapter, metrics.json and plot written to {output.path}")


def train_to_end(trainer, stop, args: argparse.Namespace, output: OutputFolder, resumed: bool):
    """Train to the run's last step (from the work folder's last checkpoint when ``resumed``), then evaluate.

    Args:
        trainer: The run's Trainer.
        stop: Its `lntune.cli.interrupt.StopOnInterrupt` callback (armed here: Ctrl-C saves a checkpoint).
        args: The parsed ``lntune train`` options (for the resume command line).
        output: The run's output folder.
        resumed: Whether the run continues an interrupted one (``--resume``).

    Returns:
        Trainer's ``TrainOutput`` and the metrics of the final weights' evaluation.

    Raises:
        Interrupted: Ctrl-C stopped the run before its last step; the message says how to resume.
    """
    resume_from = str(_last_checkpoint(output.work)) if resumed else None
    with stop.armed():
        result = trainer.train(resume_from_checkpoint=resume_from)
    if stop.requested and result.global_step < trainer.state.max_steps:
        raise Interrupted(_interrupted(args, output, trainer.state.max_steps))
    return result, _final_evaluation(trainer)


def as_before_metrics(before: dict) -> dict:
    """The evaluation before training (``before_loss``...) under its metrics.json names (``eval_loss_before``...)."""
    return {k.replace("before_", "eval_") + "_before": v for k, v in before.items() if k.startswith("before_")}


def run_record(args: argparse.Namespace, model_path: str, max_length: int, **fields) -> RunRecord:
    """The `RunRecord` of a training run: base model, task, columns and ``max_length``, plus ``fields``
    (``labels``, ``extra``)."""
    return RunRecord(
        base_model=model_path,
        task=args.task,
        text_column=args.text_column,
        label_column=args.label_column,
        max_length=max_length,
        **fields,
    )


def _final_evaluation(trainer) -> dict:
    """The evaluation of the final weights: Trainer's own at the last step if it made one, else a new one."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return last
    return trainer.evaluate()


def _write_outputs(trainer, model, args, name: str, record: RunRecord, metrics: dict, output: OutputFolder) -> None:
    from lntune.cli.plot import plot_curves

    work = output.work
    model.save_pretrained(work)
    (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    history = trainer.state.log_history
    if "eval_loss_before" in metrics:
        # Trainer.train() starts a fresh log, which drops the evaluation made before training.
        before = {"before_loss": metrics["eval_loss_before"], "before_accuracy": metrics.get("eval_accuracy_before")}
        history = [{"step": 0, **before}, *history]
    data = Path(args.data).name if args.data else DEFAULT_TRAIN
    steps = plural(metrics["train_steps"], "step")
    title = f"LN tuning of {name} on {data}\nlr {metrics['learning_rate']:.3g}, batch {args.batch_size}, {steps}"
    plot_curves(history, work / PLOT_FILE, title)
    shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)  # last: until here, Ctrl-C leaves one to resume from
    output.publish(RUN_FILE, record.to_dict())
