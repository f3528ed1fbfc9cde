"""``lntune eval``, ``lntune inspect`` and ``lntune merge``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from lntune.cli.arguments import positive_int
from lntune.cli.common import CLIError, say, use_cpu
from lntune.cli.data import (
    check_columns,
    check_eval_labels,
    check_train_labels,
    label_name,
    label_names,
    load_table,
    tokenize,
)
from lntune.cli.output import MERGE_FILE, OutputFolder
from lntune.loading import load_model, load_tokenizer, max_tokens, packaged_model_path, set_pad_token
from lntune.run_record import RUN_FILE, RunRecord
from lntune.tasks import TRAINABLE_TASKS, Task, task_named


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lntune eval``."""
    parser.add_argument("--adapter", metavar="DIR", required=True, help="adapter folder written by lntune train")
    parser.add_argument("--data", metavar="FILE", required=True, help="data to score: .csv, .json or .jsonl")
    parser.add_argument(
        "--model", metavar="PATH", help="base model folder (default: the one the adapter was trained on)"
    )
    parser.add_argument("--text-column", metavar="NAME", help="column with the text (default: as in training)")
    parser.add_argument("--label-column", metavar="NAME", help="column with the label (default: as in training)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default: 64")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lntune inspect``."""
    parser.add_argument(
        "--model", metavar="PATH", help="local Transformers model folder (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument("--task", choices=TRAINABLE_TASKS, default="seq-cls", help="default: seq-cls")
    parser.add_argument(
        "--target-modules", nargs="+", metavar="NAME", help="modules to tune (default: the model type's norms)"
    )
    parser.add_argument(
        "--num-labels", type=positive_int, metavar="N", help="seq-cls: classes of the head (default: the model's)"
    )
    parser.add_argument(
        "--data", metavar="FILE", help="seq-cls: size the head by the labels of this file, as lntune train would"
    )
    parser.add_argument("--text-column", metavar="NAME", default="text", help="with --data (default: text)")
    parser.add_argument("--label-column", metavar="NAME", default="label", help="with --data (default: label)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lntune merge``."""
    parser.add_argument("--adapter", metavar="DIR", required=True, help="adapter folder written by lntune train")
    parser.add_argument("--output", metavar="DIR", required=True, help="folder for the merged Transformers model")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier lntune result in --output")
    parser.add_argument(
        "--model", metavar="PATH", help="base model folder (default: the one the adapter was trained on)"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")


def _read_run(adapter: Path, model: str | None) -> tuple[RunRecord, Task]:
    """How the adapter was trained (its `RunRecord`), with ``--model`` in place of the recorded base model."""
    if not adapter.is_dir():
        raise CLIError(f"--adapter {adapter}: no such folder.")
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"--adapter {adapter}: not an adapter folder (it has no adapter_config.json).")
    run = RunRecord.read(adapter)  # a broken file: an InputError naming it
    task = task_named(run.task) if run.task in TRAINABLE_TASKS else task_named("causal-lm")
    run.base_model = model or run.base_model
    if not run.base_model:
        raise CLIError(f"--adapter {adapter}: it does not say which base model it belongs to; pass --model.")
    if not model and not os.path.isdir(run.base_model):
        raise CLIError(
            f"--adapter {adapter}: its base model {run.base_model} is not a local folder; pass --model PATH."
        )
    return run, task


def _load_adapted(adapter: Path, run: RunRecord, task: Task, trust_remote_code: bool):
    from lntune import PeftModel

    model = load_model(run.base_model, task, run.labels, trust_remote_code=trust_remote_code).model
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"--adapter {adapter}: does not fit {run.base_model}: {exc}") from None


def evaluate(model, tokenizer, dataset, task: Task, batch_size: int) -> dict:
    """Loss (and accuracy for seq-cls) of ``model`` on a tokenized dataset, through ``Trainer.evaluate``."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, TrainingArguments

    from lntune.cli.progress import wants_progress_bar
    from lntune.cli.trainer import AdapterTrainer, accuracy

    classify = task.classifies
    collator = DataCollatorWithPadding(tokenizer) if classify else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    with tempfile.TemporaryDirectory(prefix="lntune-eval-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            remove_unused_columns=False,
            dataloader_pin_memory=False,
            use_cpu=use_cpu(),
            prediction_loss_only=not classify,
            disable_tqdm=not wants_progress_bar(),
            log_level="error",
        )
        trainer = AdapterTrainer(
            model=model,
            args=arguments,
            eval_dataset=dataset,
            data_collator=collator,
            compute_metrics=accuracy if classify else None,
            token_loss=not classify,
        )
        return trainer.evaluate()


def run_eval(args: argparse.Namespace) -> dict:
    """``lntune eval``: score an adapter on a data file; the metrics go to stdout as JSON.

    Example:
        >>> run_eval(build_parser().parse_args(["eval", "--adapter", "out", "--data", "test.csv"]))
        {'eval_loss': 0.52, 'eval_accuracy': 0.78, ...}
    """
    adapter = Path(args.adapter)
    run, task = _read_run(adapter, args.model)
    text_column = args.text_column or run.text_column
    label_column = (args.label_column or run.label_column) if task.classifies else None
    table = load_table(args.data, "--data")
    column, value = run.extra.get("adapter_column"), run.extra.get("adapter_value")
    if column and value is not None and any(column in row for row in table):
        # One adapter of a many-adapter run: its own rows of a file that holds every adapter's.
        table = [row for row in table if column in row and label_name(row[column]) == value]
        if not table:
            raise CLIError(f"--data {args.data}: no row has {value!r} in column {column!r} (this adapter's data).")
    check_columns(table, args.data, "--data", text_column, label_column)
    labels = run.labels or []
    if label_column:
        if not labels:
            raise CLIError(f"--adapter {adapter}: no label names ({RUN_FILE} is missing); it was not made by lntune.")
        check_eval_labels(labels, [row[label_column] for row in table], args.data, option="--data")
    tokenizer = load_tokenizer(run.base_model, args.trust_remote_code)
    model = _load_adapted(adapter, run, task, args.trust_remote_code)
    set_pad_token(model, tokenizer.pad_token_id)
    max_length = run.max_length or max_tokens(run.base_model, tokenizer, args.trust_remote_code)
    dataset = tokenize(table, tokenizer, text_column, max_length, label_column, labels)
    metrics = {k: v for k, v in evaluate(model, tokenizer, dataset, task, args.batch_size).items() if k != "epoch"}
    metrics["num_examples"] = len(dataset)
    print(json.dumps(metrics, indent=2))
    return metrics


def run_inspect(args: argparse.Namespace) -> list[dict]:
    """``lntune inspect``: print the modules LN tuning would train and the trainable share.

    Returns:
        One dict per tuned module: ``name``, ``type``, ``params``, ``kind`` (``norm`` or ``modules_to_save``).
    """
    from lntune import LNTuningConfig, LNTuningLayer, get_peft_model

    model_path = args.model or packaged_model_path()
    task = task_named(args.task)
    labels = _inspect_labels(args, task)
    num_labels = None if labels else args.num_labels
    model = load_model(model_path, task, labels, num_labels, trust_remote_code=args.trust_remote_code).model
    try:
        config = LNTuningConfig(task_type=task.task_type, target_modules=args.target_modules)
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise CLIError(f"--target-modules: {exc}") from None
    rows = []
    for name, module in peft_model.base_model.tuner_modules():
        kind = "norm" if isinstance(module, LNTuningLayer) else "modules_to_save"
        tuned = module.module_for("default")
        params = sum(p.numel() for p in tuned.parameters())
        rows.append({"name": name, "type": type(module.original_module).__name__, "params": params, "kind": kind})
    width = max(len("module"), *(len(r["name"]) for r in rows))
    type_width = max(len("type"), *(len(r["type"]) for r in rows))
    print(f"{'module':<{width}}  {'type':<{type_width}}  {'params':>10}  tuned as")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['type']:<{type_width}}  {r['params']:>10,d}  {r['kind']}")
    trainable, total = peft_model.get_nb_trainable_parameters()
    config = peft_model.peft_config["default"]
    if task.classifies:
        size = model.config.num_labels
        how = "the labels of --data" if labels else "--num-labels" if args.num_labels else "the model's config"
        hint = "" if labels or args.num_labels else "; size it with --num-labels N or --data FILE"
        print(f"head: {size} classes, from {how}{hint}")
    print(f"target_modules: {config.target_modules}")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return rows


def _inspect_labels(args: argparse.Namespace, task: Task) -> list[str] | None:
    """The label names of ``--data`` (as ``lntune train`` reads them) for ``lntune inspect``, or None."""
    if not task.classifies:
        if args.data or args.num_labels:
            raise CLIError(f"--data and --num-labels size a classification head; --task {task.name} has none.")
        return None
    if not args.data:
        return None
    if args.num_labels:
        raise CLIError("--data and --num-labels both size the head; give one.")
    table = load_table(args.data, "--data")
    check_columns(table, args.data, "--data", args.text_column, args.label_column)
    labels = label_names([row[args.label_column] for row in table])
    check_train_labels(labels, args.label_column, args.data)
    return labels


def run_merge(args: argparse.Namespace) -> Path:
    """``lntune merge``: write the base model with the adapter merged in, plus its tokenizer.

    Returns:
        The output folder: a plain Transformers model (``from_pretrained`` needs no lntune), with
        ``lntune_merge.json`` saying which adapter and base model it came from.
    """
    adapter = Path(args.adapter)
    run, task = _read_run(adapter, args.model)
    if Path(os.path.abspath(args.output)) == Path(os.path.abspath(adapter)):
        raise CLIError(f"--output {args.output}: is the --adapter folder; write the merged model to a new folder.")
    with OutputFolder(args.output, overwrite=args.overwrite) as output:
        output.check_work("merge")
        tokenizer = load_tokenizer(run.base_model, args.trust_remote_code)
        merged = _load_adapted(adapter, run, task, args.trust_remote_code).merge_and_unload()
        set_pad_token(merged, tokenizer.pad_token_id)
        output.create_work("merge", {"adapter": os.path.abspath(adapter)})
        try:
            merged.save_pretrained(output.work)
            tokenizer.save_pretrained(output.work)
            output.publish(MERGE_FILE, {"adapter": os.path.abspath(adapter), "base_model": run.base_model})
        except BaseException:
            output.discard_work()
            raise
    say(f"lntune: merged model written to {output.path}")
    return output.path
