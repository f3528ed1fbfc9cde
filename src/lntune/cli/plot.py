"""The training-curve plot of ``lntune train``: train loss (raw and smoothed), eval loss and accuracy."""

from __future__ import annotations

from pathlib import Path


def evaluations(log_history: list[dict]) -> list[dict]:
    """One evaluation per step, in step order: ``{"step", "loss", "accuracy"}`` (accuracy may be None).

    The evaluation before training is logged with the prefix ``before``; a step evaluated twice
    (Trainer's last evaluation and a later one of the same weights) is kept once, the later record.

    Example:
        >>> evaluations([{"step": 0, "before_loss": 0.69}, {"step": 4, "eval_loss": 0.5, "eval_accuracy": 0.8}])
        [{'step': 0, 'loss': 0.69, 'accuracy': None}, {'step': 4, 'loss': 0.5, 'accuracy': 0.8}]
    """
    by_step = {}
    for record in log_history:
        for prefix in ("eval_", "before_"):
            if prefix + "loss" in record:
                loss, accuracy = record[prefix + "loss"], record.get(prefix + "accuracy")
                by_step[record["step"]] = {"step": record["step"], "loss": loss, "accuracy": accuracy}
    return [by_step[step] for step in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (fewer at the ends), so the curve does not lag.

    Example:
        >>> smooth([1.0, 2.0, 3.0, 4.0], 3)
        [1.5, 2.0, 3.0, 3.5]
    """
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def plot_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Write a PNG of the training loss (raw, faint, and smoothed), eval loss and eval accuracy by step.

    Args:
        log_history: ``trainer.state.log_history``, with the evaluation before training (prefix
            ``before``) at step 0 if there was one.
        path: The PNG file to write.
        title: The plot's title (model, data, learning rate...); may hold a second line.

    Example:
        >>> plot_curves(trainer.state.log_history, Path("curves.png"), "LN tuning of MiniLM on reviews.csv")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    handles, names = _draw_curves(ax, log_history)
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the axes
    fig.savefig(path)
    plt.close(fig)


def plot_adapters(log_history: list[dict], before: list[float], after: list[float], path: Path, title: str) -> None:
    """Write a PNG of a many-adapter run: the curves of `plot_curves` (accuracy: the mean over adapters) on the
    left, and on the right the distribution of the adapters' held-out accuracy before and after training.

    Args:
        log_history: As for `plot_curves`.
        before: Each adapter's held-out accuracy before training.
        after: Each adapter's held-out accuracy after training.
        path: The PNG file to write.
        title: The title of the whole figure.

    Example:
        >>> plot_adapters(history, [0.5, 0.48], [0.81, 0.9], Path("curves.png"), "LN tuning of 2 adapters")
    """
    plt = _pyplot()
    fig, (ax, dist) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    handles, names = _draw_curves(ax, log_history, accuracy_label="mean eval accuracy over adapters")
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    bins = [i / 20 for i in range(21)]
    dist.hist(before, bins=bins, color="tab:gray", alpha=0.5, label=f"before (mean {_mean(before):.3f})")
    dist.hist(after, bins=bins, color="tab:green", alpha=0.7, label=f"after (mean {_mean(after):.3f})")
    dist.set_xlabel("held-out accuracy")
    dist.set_ylabel("adapters")
    dist.set_xlim(0, 1)
    dist.set_title(f"{len(after)} adapters", fontsize=10)
    dist.grid(alpha=0.3)
    dist.legend(frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_curves(ax, log_history: list[dict], accuracy_label: str = "eval accuracy") -> tuple[list, list[str]]:
    """Train loss (raw and smoothed), eval loss and eval accuracy on ``ax``; returns the legend's handles and names."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = evaluations(log_history)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        window = max(3, len(losses) // 10)
        ax.plot(steps, smooth(list(losses), window), color="tab:blue", linewidth=2, label="train loss, smoothed")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    scored = [e for e in evals if e["accuracy"] is not None]
    if scored:
        ax2 = ax.twinx()
        steps, accuracy = [e["step"] for e in scored], [e["accuracy"] for e in scored]
        ax2.plot(steps, accuracy, "s--", color="tab:green", label=accuracy_label)
        ax2.set_ylabel("held-out accuracy")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    return handles, names
