"""One fine-tuning run on a bundled dataset, for the sweep and the results table (run in a subprocess each).

    python benchmarks/_bench.py --method ln --lr 1e-2 --dataset movie_reviews --train-size 640

prints one JSON line: held-out accuracy, trainable parameters, seconds per step and peak memory (RSS).
Training uses the first ``--train-size`` rows (``--sample random``: a seeded random sample of that many),
``--warmup`` of the steps as linear warm-up (rounded up, as the CLI did, or down with ``--warmup-round
floor``), then ``--schedule``; ``--max-steps`` overrides ``--epochs``.
Methods: ``ln`` (lntune), ``head`` (classifier only), ``full`` (every weight), ``lora`` (PEFT LoRA r=8 on
query/value, classifier trained in full). Everything else is the CLI's: data loading, tokenization,
the Trainer and its metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _trainable_model(method: str, model):
    if method == "ln":
        from lntune import LNTuningConfig, get_peft_model

        return get_peft_model(model, LNTuningConfig(task_type="SEQ_CLS"))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
        return get_peft_model(model, config)
    for name, param in model.named_parameters():
        param.requires_grad = method == "full" or name.startswith("classifier.")
    return model


def run(args: argparse.Namespace) -> dict:
    """Train ``args.method`` on the first ``train_size`` rows of the dataset; score the test split."""
    from transformers import DataCollatorWithPadding, TrainingArguments, set_seed

    from lntune.cli.data import bundled_file, label_names, load_table, tokenize
    from lntune.cli.trainer import AdapterTrainer, accuracy, schedule_steps
    from lntune.loading import load_model, load_tokenizer, packaged_model_path

    torch.set_num_threads(args.threads)
    train = load_table(bundled_file(f"{args.dataset}_train.csv"), "--data")
    test = load_table(bundled_file(f"{args.dataset}_test.csv"), "--eval-data")
    if args.sample == "random":
        train = random.Random(args.seed).sample(train, min(args.train_size, len(train)))
    train, test = train[: args.train_size], test[: args.eval_size]
    labels = label_names([row["label"] for row in train])
    path = packaged_model_path()
    tokenizer = load_tokenizer(path)
    set_seed(args.seed)
    model = _trainable_model(args.method, load_model(path, "seq-cls", labels).model.train())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_steps = schedule_steps(len(train), args.batch_size, args.epochs, args.max_steps)
    round_warmup = math.floor if args.warmup_round == "floor" else math.ceil
    warmup_steps = round_warmup(args.warmup * total_steps)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = AdapterTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=scratch,
                num_train_epochs=args.epochs,
                max_steps=args.max_steps,
                learning_rate=args.lr,
                lr_scheduler_type=args.schedule,
                warmup_steps=warmup_steps,  # a step count (0 included), never Transformers' float ratio
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=64,
                save_strategy="no",
                eval_strategy="no",
                report_to="none",
                remove_unused_columns=False,
                dataloader_pin_memory=False,
                disable_tqdm=True,
                seed=args.seed,
            ),
            train_dataset=tokenize(train, tokenizer, "text", 128, "label", labels),
            eval_dataset=tokenize(test, tokenizer, "text", 128, "label", labels),
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )
        result = trainer.train()
        metrics = trainer.evaluate()
    return {
        "method": args.method,
        "dataset": args.dataset,
        "lr": args.lr,
        "schedule": args.schedule,
        "warmup_steps": warmup_steps,
        "train_size": len(train),
        "seed": args.seed,
        "accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": result.training_loss,
        "trainable_params": trainable,
        "s_per_step": result.metrics["train_runtime"] / result.global_step,
        "steps": result.global_step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["ln", "head", "full", "lora"], default="ln")
    p.add_argument("--dataset", default="movie_reviews", help="movie_reviews or amazon_reviews")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", default="linear", help="Transformers lr_scheduler_type")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of the steps")
    p.add_argument("--warmup-round", choices=["ceil", "floor"], default="ceil")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when above 0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--sample", choices=["first", "random"], default="first", help="which training rows")
    p.add_argument("--eval-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p


def run_in_subprocess(**options) -> dict:
    """`run` in a fresh process (so that peak memory is its own); options are `parser` flags."""
    argv = [sys.executable, str(Path(__file__).resolve())]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    print(json.dumps(run(parser().parse_args())))
