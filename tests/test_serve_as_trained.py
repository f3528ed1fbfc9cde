"""``lntune serve`` serves an adapter as it was trained and evaluated, and says clearly what it cannot serve.

* The same labels and probabilities as ``lntune eval``: inputs are cut at the adapter's recorded
  ``max_length`` (right side, the tokenizer's truncation), as training and evaluation did.
* Adapters of another base model or task: left out of ``/v1/models`` with one warning each, refused with a
  400 that says why; load errors name the adapter, never an internal name.
* A port in use: one line, exit code 2, before anything is announced. Ctrl-C exits 130, SIGTERM 143 (as the
  docs say).
* ``--preload``: every adapter loaded before ``/ready``, with progress in the log.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from test_cli import tiny_files
from test_serve import ATOL, Server, make_adapters, metric, serving, tiny_model

from lntune import LNTuningConfig, get_peft_model
from lntune.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Held-out texts, several longer than the 6 tokens the adapter is trained with.
LONG_TEXTS = [
    "a great fun movie with brilliant acting and a wonderful story",
    "dull and far too long",
    "I hated this mess, terrible acting and a weak and boring story",
    "wonderful and moving",
    "an awful boring film that never ends and never gets better",
    "brilliant acting and a great story",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter trained with ``lntune train --max-length 6`` (recorded in its lntune_run.json) and held-out
    data with texts longer than that."""
    tmp = tmp_path_factory.mktemp("as-trained")
    files = tiny_files(tmp)
    files["sharp"] = str(_sharp_bert(Path(files["bert"]), tmp / "sharp-bert"))
    held_out = tmp / "held_out.csv"
    labels = ["positive", "negative", "negative", "positive", "negative", "positive"]
    held_out.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in zip(LONG_TEXTS, labels)))
    output = tmp / "adapters" / "short"
    argv = ["train", "--model", files["sharp"], "--data", files["train"], "--eval-data", files["eval"]]
    assert main([*argv, "--output", str(output), "--max-steps", "6", "--batch-size", "8", "--max-length", "6"]) == 0
    assert json.loads((output / "lntune_run.json").read_text())["max_length"] == 6
    return tmp, files, output, held_out


def _sharp_bert(tiny: Path, folder: Path) -> Path:
    """A tiny BERT classifier whose outputs depend on every token (weights drawn with std 0.5: with the usual
    0.02 a 16-wide model's [CLS] state hardly sees the other tokens, and truncation would change nothing)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny))
    size = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=64, initializer_range=0.5, **size
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _in_process_eval(adapter: Path, texts: list[str], side: str = "right", truncate: bool = True) -> list[torch.Tensor]:
    """Class probabilities as ``lntune eval`` computes them: its model loading and its tokenization."""
    from lntune.cli.commands import _load_adapted, _read_run
    from lntune.cli.data import tokenize
    from lntune.loading import load_tokenizer

    run, task = _read_run(adapter, None)
    tokenizer = load_tokenizer(run.base_model)
    tokenizer.truncation_side = side
    model = _load_adapted(adapter, run, task, False).eval()
    rows = tokenize([{"text": t} for t in texts], tokenizer, "text", run.max_length if truncate else 64, None, [])
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r["input_ids"]])).logits[0].softmax(-1) for r in rows]


def test_serve_answers_as_lntune_eval_with_the_recorded_max_length(trained, capsys):
    tmp, files, adapter, held_out = trained
    assert main(["eval", "--adapter", str(adapter), "--data", str(held_out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    expected = _in_process_eval(adapter, LONG_TEXTS)
    whole = _in_process_eval(adapter, LONG_TEXTS, truncate=False)  # what a server that does not truncate gives
    assert max(float((a - b).abs().max()) for a, b in zip(expected, whole)) > 0.01  # truncation matters here
    labels = json.loads((adapter / "lntune_run.json").read_text())["labels"]
    with serving(tmp, "--adapters", str(adapter), cwd=tmp) as server:  # the base model: as recorded
        url = server.url + "/v1/classify"
        body = httpx.post(url, json={"model": "short", "input": LONG_TEXTS}, timeout=60).json()
        served = [torch.tensor(item["probs"]) for item in body["data"]]
        for got, want in zip(served, expected, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        truth = [line.rsplit(",", 1)[1] for line in held_out.read_text().splitlines()[1:]]
        accuracy = sum(item["label"] == t for item, t in zip(body["data"], truth)) / len(truth)
        assert accuracy == pytest.approx(evaluated["eval_accuracy"])
        assert all(item["label"] == labels[int(p.argmax())] for item, p in zip(body["data"], expected))
        assert body["usage"]["prompt_tokens"] == sum(min(6, len(r)) for r in _token_lists(files["sharp"]))

        left = httpx.post(url, json={"model": "short", "input": LONG_TEXTS, "truncation_direction": "left"}).json()
        for item, want in zip(left["data"], _in_process_eval(adapter, LONG_TEXTS, side="left")):
            torch.testing.assert_close(torch.tensor(item["probs"]), want, atol=ATOL, rtol=0)
        refused = httpx.post(url, json={"model": "short", "input": LONG_TEXTS, "truncate": False})
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "input_too_long"
        assert "max_length 6" in error["message"] and "input[0]" in error["message"]
        short = httpx.post(url, json={"model": "short", "input": LONG_TEXTS[3], "truncate": False}).json()
        torch.testing.assert_close(torch.tensor(short["data"][0]["probs"]), expected[3], atol=ATOL, rtol=0)


def _token_lists(model: str) -> list[list[int]]:
    return transformers.AutoTokenizer.from_pretrained(model)(LONG_TEXTS)["input_ids"]


def _adapter_for(base: Path, root: Path, name: str, task: str = "SEQ_CLS", record: dict | None = None) -> Path:
    folder = make_adapters(base, task, root, [name], seed=11)[name]
    if record is not None:
        (folder / "lntune_run.json").write_text(json.dumps(record))
    return folder


def _tiny_bert_copy(source: Path, target: Path, hidden: int | None = None) -> Path:
    """A copy of the tiny BERT folder, or (``hidden``) a BERT of another size with the same tokenizer."""
    if hidden is None:
        shutil.copytree(source, target)
        return target
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    size = dict(hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **size)
    transformers.BertForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_adapters_of_another_base_model_or_task_are_left_out_and_refused_with_400(trained, tmp_path):
    _, files, _, _ = trained
    bert = Path(files["bert"])
    other = _tiny_bert_copy(bert, tmp_path / "other-bert", hidden=32)
    copy = _tiny_bert_copy(bert, tmp_path / "copies" / "bert-copy")
    root = tmp_path / "adapters"
    labels = {"task": "seq-cls", "labels": ["negative", "positive"]}
    _adapter_for(bert, root, "mine", record=labels)
    _adapter_for(copy, root, "from-a-copy", record=labels)  # another folder, same config: the same model
    _adapter_for(other, root, "foreign", record={**labels, "base_model": str(other)})
    hub = _adapter_for(bert, root, "hub-foreign", record=labels)
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/other-model"}))
    named = _adapter_for(bert, root, "hub-named", record=labels)
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-bert"}))
    _adapter_for(bert, root, "embedder", task="FEATURE_EXTRACTION")  # another task
    # An adapter whose files do not say its base model, made for a Llama: it fails to load.
    llama = tiny_model(tmp_path / "tiny-llama", "llama")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(llama)
    get_peft_model(base, LNTuningConfig(task_type="SEQ_CLS")).save_pretrained(root / "unknown-llama")
    config_file = root / "unknown-llama" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": None}))

    with serving(tmp_path, "--model", str(bert), "--adapters", str(root), "--task", "seq-cls", "--preload") as server:
        for _ in range(3):
            ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
            assert ids == ["tiny-bert", "from-a-copy", "hub-named", "mine", "unknown-llama"]
        for name, base in [("foreign", str(other)), ("hub-foreign", "someone/other-model")]:
            for _ in range(2):
                response = httpx.post(server.url + "/v1/classify", json={"model": name, "input": "hi"})
                error = response.json()["error"]
                assert response.status_code == 400 and error["code"] == "adapter_base_model_mismatch"
                assert base in error["message"] and "tiny-bert" in error["message"]
                assert not re.search(r"\ba\d+\b", error["message"])
        task = httpx.post(server.url + "/v1/classify", json={"model": "embedder", "input": "hi"})
        assert task.status_code == 400 and task.json()["error"]["code"] == "adapter_task_mismatch"
        for name in ["mine", "from-a-copy", "hub-named"]:
            assert httpx.post(server.url + "/v1/classify", json={"model": name, "input": "hi"}).status_code == 200
        broken = httpx.post(server.url + "/v1/classify", json={"model": "unknown-llama", "input": "hi"})
        message = broken.json()["error"]["message"]
        assert broken.status_code == 500 and "'unknown-llama'" in message, message
        assert not re.search(r"'a\d+'|\ba\d+\b", message), message  # no internal name
        assert metric(server, "lntune_adapter_loads_total") == 3  # preloaded; nothing loaded on the way
        log = server.output()
    for name in ["foreign", "hub-foreign", "embedder"]:
        lines = [line for line in log.splitlines() if f"adapter '{name}' left out" in line]
        assert len(lines) == 1, (name, log[-3000:])  # once, not per request or listing
    assert "preloading adapters: 4/4" in log and "preloaded 3 adapters" in log and "1 failed" in log
    announced = log.index("loading the model")
    assert all(log.index(f"adapter '{n}' left out") < announced for n in ["foreign", "embedder"])  # at discovery


def test_a_port_in_use_is_one_line_and_exit_code_2(trained, capsys):
    _, _, adapter, _ = trained
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--adapters", str(adapter), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port}" in err[0] and "in use" in err[0], err
    assert err[0].startswith("lntune serve: error:")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_ctrl_c_exits_130_and_sigterm_143_as_documented(trained, sig, code):
    tmp, _, adapter, _ = trained
    server = Server(tmp, "--adapters", str(adapter), cwd=tmp)
    try:
        server.process.send_signal(sig)
        assert server.process.wait(30) == code  # -15: killed by SIGTERM, which a shell reports as 143
    except subprocess.TimeoutExpired:
        server.stop()
        raise
    assert "Application shutdown complete" in server.output()
    docs = (DOCS / "serving.md").read_text()
    assert "Ctrl-C (SIGINT) exits with code 130" in docs and "SIGTERM with 143" in docs
