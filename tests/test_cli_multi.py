"""``lntune train --adapter-column``: one adapter per value, trained in one run, served by ``lntune serve``."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from conftest import communicate_or_kill
from test_cli import _Interrupt, tiny_model_folder
from test_serve import serving

from lntune import PeftModel
from lntune.cli import build_parser, main
from lntune.cli.common import Interrupted
from lntune.cli.multi import run_train_command

#: Three values of the adapter column with 2, 3 and 5 classes; "Books & Lit" is no safe folder name.
TASKS = {
    "two": ["positive", "negative"],
    "three": ["positive", "negative", "neutral"],
    "Books & Lit": ["poetry", "novel", "essay", "drama", "letters"],
}
WORDS = {
    "positive": "great fun loved brilliant",
    "negative": "awful boring hated dull",
    "neutral": "okay fine average plain",
    "poetry": "verse rhyme stanza meter",
    "novel": "chapter plot hero saga",
    "essay": "argument thesis claim point",
    "drama": "stage act scene actor",
    "letters": "dear yours sincerely reply",
}
MAPPED = "Books_Lit-"  # the folder of "Books & Lit" starts so


def _rows(per_label: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for task, labels in TASKS.items():
        for i in range(per_label * len(labels)):
            label = labels[i % len(labels)]
            words = WORDS[label].split()
            rows.append({"text": " ".join(rng.choice(words) for _ in range(3)), "label": label, "task": task})
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("multi")
    return {
        "bert": tiny_model_folder(tmp, "bert"),
        "train": _write(tmp / "train.csv", _rows(4, seed=0)),
        "eval": _write(tmp / "eval.csv", _rows(1, seed=1)),
    }


def _train(files: dict, output: Path, *extra: str, callbacks: list | None = None) -> dict:
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--adapter-column", "task", "--output", str(output), "--max-steps", "6", "--batch-size", "8"]
    argv += ["--lr", "0.05", *extra]
    return run_train_command(build_parser().parse_args(argv), callbacks=callbacks)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("run") / "adapters"
    return output, _train(files, output)


def _folders(output: Path) -> dict[str, Path]:
    found = {p.name: p for p in output.iterdir() if p.is_dir()}
    mapped = [name for name in found if name.startswith(MAPPED)]
    assert len(mapped) == 1
    return {"two": found["two"], "three": found["three"], "Books & Lit": found[mapped[0]]}


def _base(files: dict, labels: list[str]):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        files["bert"], num_labels=len(labels), ignore_mismatched_sizes=True
    ).eval()


def test_one_peft_adapter_folder_per_value_with_its_own_labels_and_metrics(files, trained, capsys):
    output, metrics = trained
    folders = _folders(output)
    assert {p.name for p in output.iterdir()} == {*(f.name for f in folders.values()), "lntune_run.json",
                                                  "metrics.json", "training_curves.png"}  # fmt: skip
    marker = json.loads((output / "lntune_run.json").read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in output.iterdir())  # --overwrite may replace them
    assert marker["adapters"]["Books & Lit"] == folders["Books & Lit"].name
    assert metrics["adapters"] == 3 and metrics["train_steps"] == 6 and set(metrics["per_adapter"]) == set(TASKS)
    assert (output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inputs = {"input_ids": torch.tensor([[101, 2307, 3185, 102]])}
    for value, folder in folders.items():
        run = json.loads((folder / "lntune_run.json").read_text())
        assert run["labels"] == sorted(TASKS[value]) and run["adapter_value"] == value
        assert run["adapter_column"] == "task" and sorted(run["files"]) == sorted(p.name for p in folder.iterdir())
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["num_labels"] == len(TASKS[value]) and saved["train_steps"] >= 1
        assert saved["eval_accuracy"] == metrics["per_adapter"][value]["eval_accuracy"]
        model = PeftModel.from_pretrained(_base(files, TASKS[value]), folder)
        with torch.no_grad():
            assert model(**inputs).logits.shape == (1, len(TASKS[value]))
        # lntune eval on the file of every value scores this adapter on its own rows
        assert main(["eval", "--adapter", str(folder), "--data", files["eval"]]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["num_examples"] == len(TASKS[value])
        assert scored["eval_accuracy"] == pytest.approx(saved["eval_accuracy"])
        assert scored["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-4)


def test_values_spelled_like_the_runs_own_files_get_folders_of_their_own():
    from lntune.cli.multi_data import folder_name
    from lntune.cli.output import RUN_NAMES

    for name in RUN_NAMES:
        for value in (name, name.upper()):
            assert folder_name(value).lower() not in RUN_NAMES and folder_name(value).startswith(value)
    assert folder_name("customer-7") == "customer-7"
    assert len({folder_name(v) for v in ("checkpoints", "Checkpoints", "CHECKPOINTS")}) == 3


def test_the_run_prints_its_adapters_the_mapped_folder_and_the_worst(files, tmp_path, capfd):
    output = tmp_path / "printed"
    _train(files, output, "--max-steps", "2")
    out, err = capfd.readouterr()
    assert out == ""
    assert "for 3 adapters (column 'task', 2 to 5 classes)" in err
    assert "1 value is not a safe folder name; its folder: 'Books & Lit' -> Books_Lit-" in err
    assert "the 3 adapters with the lowest held-out accuracy:" in err
    assert err.strip().splitlines()[-1].startswith("lntune: 3 adapters: mean held-out accuracy")


def test_lntune_serve_serves_every_adapter_of_the_run(files, trained, tmp_path):
    output, _ = trained
    folders = _folders(output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["bert"])
    text = "great fun movie"
    with serving(tmp_path, "--adapters", str(output)) as server:  # no --model: the run recorded it
        names = {m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]}
        assert {f.name for f in folders.values()} <= names
        for value in ("two", "Books & Lit"):
            folder = folders[value]
            response = httpx.post(server.url + "/v1/classify", json={"model": folder.name, "input": [text]}, timeout=60)
            assert response.status_code == 200, response.text
            item = response.json()["data"][0]
            model = PeftModel.from_pretrained(_base(files, TASKS[value]), folder)
            with torch.no_grad():
                expected = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
            torch.testing.assert_close(torch.tensor(item["probs"]), expected, atol=1e-5, rtol=0)
            assert item["num_classes"] == len(TASKS[value])
            assert item["label"] == sorted(TASKS[value])[int(expected.argmax())]


def test_resume_continues_an_interrupted_multi_adapter_run(files, trained, tmp_path):
    straight, straight_metrics = trained
    output = tmp_path / "resumed"
    with pytest.raises(Interrupted, match=r"checkpoint of step 2 is kept in .*resume with: lntune train .*--resume"):
        _train(files, output, callbacks=[_Interrupt(at=2)])
    checkpoint = tmp_path / ".resumed.partial" / "checkpoints" / "checkpoint-2"
    assert not output.exists() and (checkpoint / "a0" / "adapter_model.safetensors").exists()
    assert (
        main(
            [
                "train",
                "--model",
                files["bert"],
                "--data",
                files["train"],
                "--adapter-column",
                "task",
                "--output",
                str(output),
            ]
        )
        == 2
    )  # fmt: skip  (kept: --resume or --overwrite)
    metrics = _train(files, output, "--resume")
    assert metrics["train_steps"] == 6
    for value in TASKS:
        assert (
            metrics["per_adapter"][value]["eval_accuracy_before"]
            == straight_metrics["per_adapter"][value]["eval_accuracy_before"]
        )
    inputs = {"input_ids": torch.tensor([[101, 2307, 3185, 102], [101, 6659, 2143, 102]])}
    for value, folder in _folders(output).items():
        resumed = PeftModel.from_pretrained(_base(files, TASKS[value]), folder)
        plain = PeftModel.from_pretrained(_base(files, TASKS[value]), _folders(straight)[value])
        with torch.no_grad():
            torch.testing.assert_close(resumed(**inputs).logits, plain(**inputs).logits)


def test_skip_bad_adapters_leaves_out_values_that_cannot_train(files, tmp_path, capfd):
    rows = _rows(4, seed=0) + [{"text": "only one", "label": "positive", "task": "lonely"}] * 3
    data = _write(tmp_path / "with-bad.csv", rows)
    argv = ["train", "--model", files["bert"], "--data", data, "--adapter-column", "task", "--max-steps", "2"]
    argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "value 'lonely' of column 'task' has only one class ('positive')" in err
    assert "--skip-bad-adapters" in err and not (tmp_path / "out").exists()
    assert main([*argv, "--skip-bad-adapters"]) == 0
    err = capfd.readouterr().err
    assert "left out 1 value (--skip-bad-adapters): 'lonely' (one class)" in err
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["adapters"] == 3 and summary["left_out"] == ["'lonely' (one class)"]
    assert not (tmp_path / "out" / "lonely").exists()
    assert "10% of each value held out" in summary["held_out"]


def test_torchrun_two_processes_train_every_adapter_once(files, tmp_path):
    output = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lntune"]
    argv += ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--adapter-column", "task", "--output", str(output), "--epochs", "1", "--batch-size", "4"]
    argv += ["--lr", "0.05"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True
    )
    stdout, stderr = communicate_or_kill(proc, 300, "torchrun")
    assert proc.returncode == 0, stderr[-3000:]
    assert (stdout + stderr).count("adapters: mean held-out accuracy") == 1  # rank 0 only
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 5 and summary["adapters"] == 3  # 40 / (2 x 4)
    # Each adapter steps once per 8 of its own examples (the global batch), as its own 2-process run would.
    steps = {value: m["train_steps"] for value, m in summary["per_adapter"].items()}
    assert steps == {"two": 1, "three": 2, "Books & Lit": 3}  # 8, 12 and 20 training examples
    for value, folder in _folders(output).items():
        model = PeftModel.from_pretrained(_base(files, TASKS[value]), folder)
        head = model.base_model.model.classifier
        moved = (head.tuned_module("default").weight - head.original_module.weight).abs().max()
        assert moved > 0, f"adapter {value} did not train"


def test_each_adapter_of_a_run_equals_its_own_training_on_the_same_batches(files, tmp_path):
    """Without dropout, every adapter of an --adapter-column run ends equal to a plain AdamW run of that adapter
    alone on its own batches (the sampler's runs of 8; 8, 12 and 20 examples), with the run's schedule over its
    own steps and its clipping: the mixed batches, the per-adapter steps and heads of 2, 3 and 5 classes change
    nothing in what each adapter learns."""
    import math

    from safetensors.torch import load_file
    from transformers import DataCollatorWithPadding, get_scheduler

    from lntune import AdapterBatchSampler, adapter_parameters, get_peft_model_state_dict
    from lntune.cli.multi import _prepare
    from lntune.cli.train import warmup_steps

    model_dir = tmp_path / "no-dropout"
    config = transformers.AutoConfig.from_pretrained(files["bert"])
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    transformers.AutoModelForSequenceClassification.from_pretrained(files["bert"], config=config).save_pretrained(
        model_dir
    )
    transformers.AutoTokenizer.from_pretrained(files["bert"]).save_pretrained(model_dir)
    argv = ["train", "--model", str(model_dir), "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--adapter-column", "task", "--output", str(tmp_path / "out"), "--epochs", "2", "--batch-size", "8"]
    argv += ["--lr", "0.05", "--seed", "3"]
    summary = run_train_command(build_parser().parse_args(argv))
    args = build_parser().parse_args(argv)
    run = _prepare(args, str(model_dir))  # the model, heads and examples the run started from
    model = run.model.train()
    start = {
        a.name: {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=a.name).items()}
        for a in run.adapters
    }
    adapters = [e["adapter_name"] for e in run.train_set]
    sampler = AdapterBatchSampler(adapters, 8, seed=3)
    collate = DataCollatorWithPadding(run.tokenizer)
    for adapter in run.adapters:
        name, rows = adapter.name, []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            mine = [i for i in sampler if adapters[i] == name]
            rows += [mine[j : j + 8] for j in range(0, len(mine), 8)]
        assert summary["per_adapter"][adapter.value]["train_steps"] == len(rows) == 2 * math.ceil(len(mine) / 8)
        steps = len(rows)
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = get_scheduler("linear", dummy, warmup_steps(steps), steps).lr_lambdas[0]  # its own run's
        params = adapter_parameters(model, [name])[name]
        model.set_requires_grad([name], True)
        optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
        for k, batch_rows in enumerate(rows):
            batch = collate([{n: v for n, v in run.train_set[i].items() if n != "adapter_name"} for i in batch_rows])
            labels = batch.pop("labels")
            logits = model(**batch, adapter_names=[name] * len(batch_rows)).logits
            torch.nn.functional.cross_entropy(logits, labels).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.param_groups[0]["lr"] = 0.05 * schedule(k)
            optimizer.step()
            optimizer.zero_grad()
        saved = load_file(tmp_path / "out" / adapter.folder / "adapter_model.safetensors")
        alone = get_peft_model_state_dict(model, adapter_name=name)
        assert saved.keys() == alone.keys()
        assert max((saved[k] - start[name][k]).abs().max() for k in saved) > 1e-3  # it trained
        for key, value in saved.items():
            torch.testing.assert_close(alone[key].detach(), value, atol=1e-5, rtol=1e-4)


def test_without_lr_each_adapter_gets_the_default_of_its_own_run_length():
    from types import SimpleNamespace

    from lntune.cli.multi import _rates, _schedules
    from lntune.cli.train import default_learning_rate, warmup_steps

    args = build_parser().parse_args(["train", "--adapter-column", "c", "--batch-size", "1", "--epochs", "1"])
    adapters = [SimpleNamespace(name="small", train=[{}] * 20), SimpleNamespace(name="large", train=[{}] * 200)]
    schedules = _schedules(args, adapters, 220)
    assert schedules["small"] == (default_learning_rate(20), warmup_steps(20), 20)
    assert schedules["large"] == (default_learning_rate(200), warmup_steps(200), 200)
    assert schedules["large"][0] < schedules["small"][0]
    assert _rates(schedules) == f"{default_learning_rate(200):.3g} to {default_learning_rate(20):.3g}"
    given = build_parser().parse_args(["train", "--adapter-column", "c", "--batch-size", "1", "--lr", "0.02"])
    assert {lr for lr, _, _ in _schedules(given, adapters, 220).values()} == {0.02}
