"""Results tables for the README: LN tuning against the usual alternatives on the bundled data.

    python benchmarks/cli_results.py              # both tables, about 15 minutes on 2 busy CPU cores
    python benchmarks/cli_results.py --part methods

``methods``: all-MiniLM-L6-v2 on the bundled movie-review task, same budget for every method (800
training examples, 1 epoch, batch 16 = 50 steps, 10% warmup, linear decay; 500 held-out examples):
head only, LN tuning at lntune's default learning rate, LN tuning at 1e-4, full fine-tuning, and LoRA
through PEFT (r=8 on query/value). Columns: held-out accuracy, trainable parameters, seconds per step
and peak resident memory of the process (each run in its own process).

``heldout``: a task the sweep never saw (1,000 New York Times editorial snippets, 500 held out) with
``lntune train``'s defaults only, against training the classifier head alone with the same data, epochs,
batch and rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import run_in_subprocess

from lntune.cli.data import bundled_file
from lntune.cli.train import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, default_learning_rate

DEFAULT_LR = default_learning_rate(50)  # the CLI's rate for the methods table's 50 steps
METHODS = [
    ("head only", "head", DEFAULT_LR),
    ("LN tuning (lntune default lr)", "ln", DEFAULT_LR),
    ("LN tuning, lr 1e-4", "ln", 1e-4),
    ("full fine-tuning", "full", 5e-5),
    ("LoRA r=8 (PEFT)", "lora", 5e-4),
]


def methods_table() -> None:
    print("| method | lr | held-out accuracy | trainable params | s/step | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for title, method, lr in METHODS:
        r = run_in_subprocess(method=method, lr=lr, train_size=800, eval_size=500)
        print(
            f"| {title} | {lr:g} | {r['accuracy']:.3f} | {r['trainable_params']:,d} | {r['s_per_step']:.2f} "
            f"| {r['peak_rss_mb']:.0f} |",
            flush=True,
        )


def heldout_table(dataset: str = "nyt_editorials") -> None:
    train, test = bundled_file(f"{dataset}_train.csv"), bundled_file(f"{dataset}_test.csv")
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "adapter"
        argv = [sys.executable, "-m", "lntune", "train", "--data", train, "--eval-data", test, "--output", str(output)]
        subprocess.run(argv, check=True, capture_output=True, text=True)
        ln = json.loads((output / "metrics.json").read_text())
    budget = {"epochs": DEFAULT_EPOCHS, "batch_size": DEFAULT_BATCH_SIZE, "train_size": 1000, "eval_size": 500}
    head = run_in_subprocess(method="head", dataset=dataset, lr=ln["learning_rate"], **budget)
    print(f"| {dataset}, 1,000 examples, defaults | held-out accuracy | trainable params |")
    print("|---|---|---|")
    print(f"| untrained (new head) | {ln['eval_accuracy_before']:.3f} | - |")
    print(f"| head only | {head['accuracy']:.3f} | {head['trainable_params']:,d} |")
    print(f"| `lntune train` (LN tuning + head) | {ln['eval_accuracy']:.3f} | {ln['trainable_params']:,d} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["methods", "heldout", "all"], default="all")
    args = p.parse_args()
    if args.part in ("methods", "all"):
        methods_table()
    if args.part in ("heldout", "all"):
        heldout_table()


if __name__ == "__main__":
    main()
