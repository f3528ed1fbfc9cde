"""``lntune train``'s learning rate and warm-up defaults (issue 16): the rule, and runs too short to warm up."""

from __future__ import annotations

import pytest
from test_cli import tiny_files
from transformers import TrainerCallback

from lntune.cli import build_parser
from lntune.cli.train import default_learning_rate, run_train, warmup_steps


class Rates(TrainerCallback):
    """The learning rate of each optimizer step (read before the scheduler moves to the next step's)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return tiny_files(tmp_path_factory.mktemp("defaults"))


def _train(files: dict, output, *extra: str) -> tuple[dict, list[float]]:
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    rates = Rates()
    metrics = run_train(build_parser().parse_args([*argv, "--output", str(output), *extra]), callbacks=[rates])
    return metrics, rates.rates


RULE_CASES = [(1, 1e-2), (24, 1e-2), (50, 1e-2), (64, 0.5 / 64), (80, 6.25e-3), (100, 5e-3), (250, 5e-3), (10**5, 5e-3)]


@pytest.mark.parametrize(("steps", "expected"), RULE_CASES)
def test_default_learning_rate_follows_the_rule(steps, expected):
    assert default_learning_rate(steps) == pytest.approx(expected, rel=1e-3)


def test_default_learning_rate_never_grows_with_the_run():
    rates = [default_learning_rate(steps) for steps in range(1, 5001)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert all(5e-3 <= rate <= 1e-2 for rate in rates)


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (9, 0), (10, 1), (24, 2), (50, 5), (126, 12), (250, 25)])
def test_warmup_is_a_tenth_rounded_down(steps, warmup):
    assert warmup_steps(steps) == warmup


def test_one_step_run_trains_at_the_rule_rate(files, tmp_path, capsys):
    metrics, rates = _train(files, tmp_path / "one", "--max-steps", "1")
    assert rates == [pytest.approx(default_learning_rate(1))] and rates[0] > 0
    assert metrics["learning_rate"] == pytest.approx(default_learning_rate(1)) and metrics["train_steps"] == 1
    assert f"1 step at lr {default_learning_rate(1):g}" in capsys.readouterr().err


def test_explicit_lr_wins_and_warmup_starts_at_zero(files, tmp_path, capsys):
    metrics, rates = _train(files, tmp_path / "explicit", "--max-steps", "10", "--lr", "0.004")
    assert len(rates) == 10 and rates[0] == 0.0 and max(rates) == pytest.approx(0.004)  # one warm-up step
    assert metrics["learning_rate"] == 0.004
    assert "10 steps at lr 0.004" in capsys.readouterr().err


def test_help_names_the_rule(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.01 up to 50 steps, 0.005 from 100, in between 0.5 / steps)" in text
