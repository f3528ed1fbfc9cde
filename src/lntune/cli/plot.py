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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = evaluations(log_history)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
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
        ax2.plot(steps, accuracy, "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("held-out accuracy")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the axes
    fig.savefig(path)
    plt.close(fig)
