"""``lntune train``: LN tuning on `transformers.Trainer`, writing the adapter, metrics and a plot."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from lntune.cli.common import (
    RUN_FILE,
    TASKS,
    CLIError,
    check_output_dir,
    default_model_path,
    is_main_process,
    load_model,
    load_tokenizer,
    partial_dir,
    publish,
    say,
    set_pad_token,
    use_cpu,
)
from lntune.cli.data import (
    DEFAULT_EVAL,
    DEFAULT_TRAIN,
    bundled_file,
    check_columns,
    check_eval_labels,
    label_names,
    load_table,
    tokenize,
)

#: Defaults chosen by benchmarks/sweep_lr.py (see docs/cli.md): LN tuning needs a large learning rate.
DEFAULT_LR = 1e-2
DEFAULT_EPOCHS = 2.0
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 128
DEFAULT_WARMUP = 0.1
DEFAULT_SCHEDULE = "linear"
CHECKPOINTS = "checkpoints"


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
    parser.add_argument("--task", choices=sorted(TASKS), default="seq-cls", help="default: seq-cls")
    parser.add_argument(
        "--output", metavar="DIR", default="lntune-output", help="adapter folder to write (default: lntune-output)"
    )
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS, help=f"default: {DEFAULT_EPOCHS:g}")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default: {DEFAULT_LR:g})")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"per process (default: {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"tokens per text (default: {DEFAULT_MAX_LENGTH})"
    )
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--seed", type=int, default=42, help="default: 42")
    parser.add_argument(
        "--target-modules", nargs="+", metavar="NAME", help="modules to tune (default: the model type's norms)"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from --model")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("epochs", "lr", "batch_size", "max_length"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")


def _read_data(args: argparse.Namespace):
    """Train and eval tables, checked, and the label names (empty for causal-lm)."""
    if args.eval_data and not args.data:
        raise CLIError("--eval-data needs --data (the bundled dataset has its own test split).")
    train_path = args.data or bundled_file(DEFAULT_TRAIN)
    eval_path = args.eval_data or (None if args.data else bundled_file(DEFAULT_EVAL))
    columns = [args.text_column] + ([args.label_column] if args.task == "seq-cls" else [])
    train = load_table(train_path, "--data")
    check_columns(train, train_path, "--data", columns)
    if eval_path:
        evaluation = load_table(eval_path, "--eval-data")
        check_columns(evaluation, eval_path, "--eval-data", columns)
    else:
        if len(train) < 2:
            raise CLIError(f"--data {train_path}: 1 example is too few to hold out an eval set; pass --eval-data.")
        split = train.train_test_split(test_size=0.1, seed=args.seed)
        train, evaluation, eval_path = split["train"], split["test"], f"{train_path} (10% held out)"
    labels: list[str] = []
    if args.task == "seq-cls":
        labels = label_names(train[args.label_column])
        check_eval_labels(labels, evaluation[args.label_column], eval_path)
    return train, evaluation, labels


def _training_arguments(args: argparse.Namespace, work: Path, total_steps: int):
    from transformers import TrainingArguments

    eval_every = max(1, total_steps // 4)
    return TrainingArguments(
        output_dir=str(work / CHECKPOINTS),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=DEFAULT_SCHEDULE,
        warmup_steps=math.ceil(DEFAULT_WARMUP * total_steps),  # a step count: Transformers 4.x takes no ratio here
        weight_decay=0.0,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        logging_steps=max(1, total_steps // 25),
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
        prediction_loss_only=args.task != "seq-cls",
        log_level="error",
        log_level_replica="error",
    )


def _prepare_work_dir(work: Path, resume: bool) -> str | None:
    """Create (or, with ``--resume``, reuse) the work folder; return the checkpoint to resume from."""
    if resume:
        checkpoints = sorted((work / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        if not checkpoints:
            raise CLIError(f"--resume: no checkpoint of an interrupted run in {work}; start without --resume.")
        return str(checkpoints[-1])
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    return None


def run_train(args: argparse.Namespace, callbacks: list | None = None) -> dict:
    """Train an LN tuning adapter as ``lntune train`` does and return its metrics.

    Everything is checked before anything is written; the run works in a hidden folder next to
    ``--output`` (kept for ``--resume`` if the run is interrupted) and renames it at the end.

    Args:
        args: Parsed ``lntune train`` options.
        callbacks: Extra ``TrainerCallback`` objects.

    Returns:
        The metrics written to ``metrics.json``.

    Example:
        >>> run_train(build_parser().parse_args(["train", "--max-steps", "10"]))["eval_accuracy"]
        0.71
    """
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, set_seed

    from lntune import LNTuningConfig, get_peft_model
    from lntune.cli.trainer import AdapterTrainer, accuracy, schedule_steps

    _check_numbers(args)
    output = Path(args.output)
    check_output_dir(output)
    work = partial_dir(output)
    model_path = args.model or default_model_path()
    train_table, eval_table, labels = _read_data(args)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    set_seed(args.seed)
    model = load_model(model_path, args.task, labels, args.trust_remote_code)
    set_pad_token(model, tokenizer)
    config = LNTuningConfig(task_type=TASKS[args.task], target_modules=args.target_modules)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise CLIError(f"--target-modules: {exc}") from None
    label_column = args.label_column if args.task == "seq-cls" else None
    train_set = tokenize(train_table, tokenizer, args.text_column, args.max_length, label_column, labels)
    eval_set = tokenize(eval_table, tokenizer, args.text_column, args.max_length, label_column, labels)
    resume_from = _prepare_work_dir(work, args.resume)

    if args.task == "seq-cls":
        collator, metrics_fn = DataCollatorWithPadding(tokenizer), accuracy
    else:
        collator, metrics_fn = DataCollatorForLanguageModeling(tokenizer, mlm=False), None
    total_steps = schedule_steps(len(train_set), args.batch_size, args.epochs, args.max_steps)
    trainer = AdapterTrainer(
        model=model,
        args=_training_arguments(args, work, total_steps),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        compute_metrics=metrics_fn,
        callbacks=callbacks,
        token_loss=args.task == "causal-lm",
    )
    trainable, total = model.get_nb_trainable_parameters()
    say(
        f"lntune: LN tuning {model_path} ({args.task}) on {len(train_set)} examples, {len(eval_set)} held out; "
        f"{trainable:,d} of {total:,d} parameters trainable ({100 * trainable / total:.3f}%), "
        f"{total_steps} steps at lr {args.lr:g}"
    )
    before = {} if resume_from else trainer.evaluate(metric_key_prefix="before")
    if "before_accuracy" in before:
        say(f"lntune: held-out accuracy before training: {before['before_accuracy']:.4f}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    after = trainer.evaluate()
    metrics = {
        **{k: v for k, v in after.items() if k.startswith("eval_")},
        **{k.replace("before_", "eval_") + "_before": v for k, v in before.items() if k.startswith("before_")},
        "train_loss": result.training_loss,
        "train_runtime": result.metrics["train_runtime"],
        "train_steps": result.global_step,
        "world_size": trainer.args.world_size,
        "trainable_params": trainable,
        "all_params": total,
        "learning_rate": args.lr,
        "num_train_examples": len(train_set),
        "num_eval_examples": len(eval_set),
    }
    if is_main_process():
        _write_outputs(trainer, model, args, model_path, labels, metrics, work)
        publish(work, output)
        if "eval_accuracy" in metrics:
            say(f"lntune: held-out accuracy after training: {metrics['eval_accuracy']:.4f}")
        say(f"lntune: eval_loss {metrics['eval_loss']:.4f}; adapter, metrics.json and plot written to {output}")
    return metrics


def _write_outputs(trainer, model, args, model_path: str, labels: list[str], metrics: dict, work: Path) -> None:
    from lntune.cli.trainer import plot_curves

    shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)
    model.save_pretrained(work)
    run = {
        "base_model": model_path,
        "task": args.task,
        "labels": labels,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "max_length": args.max_length,
    }
    (work / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    history = trainer.state.log_history
    if "eval_loss_before" in metrics and not any("before_loss" in r for r in history):
        # Trainer.train() starts a fresh log, which drops the evaluation made before training.
        before = {"before_loss": metrics["eval_loss_before"], "before_accuracy": metrics.get("eval_accuracy_before")}
        history = [{"step": 0, **before}, *history]
    plot_curves(history, work / "training_curves.png")
