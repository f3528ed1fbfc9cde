"""Learning-rate and schedule sweep for LN tuning of all-MiniLM-L6-v2 on two bundled sentiment tasks.

    python benchmarks/sweep_lr.py            # about 15 minutes on 2 busy CPU cores

Each run: 800 training examples, 1 epoch, batch 16 (50 steps), 10% warmup, scored on 250 held-out
examples; one subprocess per run. Prints a table (accuracy per learning rate and task), then the
schedules at the best learning rate of the bundled task. The CLI's defaults come from this table.
"""

from __future__ import annotations

import argparse

from _bench import run_in_subprocess

LRS = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2]
TASKS = ["movie_reviews", "amazon_reviews"]
SCHEDULES = ["linear", "constant_with_warmup"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=LRS)
    p.add_argument("--train-size", type=int, default=800)
    args = p.parse_args()
    results = {}
    for task in TASKS:
        for lr in args.lrs:
            results[task, lr] = run_in_subprocess(method="ln", dataset=task, lr=lr, train_size=args.train_size)
            print(f"  {task} lr={lr:g}: {results[task, lr]['accuracy']:.3f}", flush=True)
    print("\n| learning rate | " + " | ".join(TASKS) + " |")
    print("|---|" + "---|" * len(TASKS))
    for lr in args.lrs:
        print(f"| {lr:g} | " + " | ".join(f"{results[t, lr]['accuracy']:.3f}" for t in TASKS) + " |")
    best = max(args.lrs, key=lambda lr: sum(results[t, lr]["accuracy"] for t in TASKS))
    print(f"\nschedules at lr {best:g} (movie_reviews):\n\n| schedule | accuracy |\n|---|---|")
    for schedule in SCHEDULES:
        if schedule == "linear":
            acc = results["movie_reviews", best]["accuracy"]
        else:
            acc = run_in_subprocess(
                method="ln", dataset="movie_reviews", lr=best, schedule=schedule, train_size=args.train_size
            )["accuracy"]
        print(f"| {schedule} | {acc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
