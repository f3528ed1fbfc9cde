"""Every bad input of every ``lntune`` command: exit code 2, one line on stderr, no traceback, nothing written.

Each case runs as its own process, as a user runs the command: a runner process imports lntune,
Transformers and torch once, then forks a child per case whose stdout and stderr are files (real
file descriptors, Python's default warning filters, nothing captured by pytest). The child calls
``lntune.cli.main`` exactly as ``python -m lntune`` does, so a stray warning or traceback shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import tiny_files

#: The runner: imports what the commands import (the slow part of each run), then for each JSON line
#: {"argv", "cwd", "stdout", "stderr"} on stdin: fork, run the command in the child, reply {"rc"}.
RUNNER = r"""
import json, os, sys, traceback
from lntune.cli import main
import lntune.cli.commands, lntune.cli.interrupt, lntune.cli.plot, lntune.cli.train, lntune.cli.trainer
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            code = main(case["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Runner:
    """Runs ``lntune`` commands in forked processes of one warm interpreter (see the module docstring)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, argv: list[str], cwd: Path, logs: Path) -> tuple[int, str, str]:
        """Run ``lntune *argv`` in ``cwd``; return the exit code, stdout and stderr (kept under ``logs``)."""
        out, err = logs / "stdout.txt", logs / "stderr.txt"
        case = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the runner process died"
        return json.loads(reply)["rc"], out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    runner = Runner()
    yield runner
    runner.close()


def _write(folder: Path, name: str, text: str | bytes) -> None:
    path = folder / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def shared(runner, tmp_path_factory) -> dict[str, str]:
    """Tiny models, data files of every bad kind, a trained adapter, an lntune run and a folder of the user's."""
    root = tmp_path_factory.mktemp("shared")
    files = tiny_files(root)
    data = root / "data"
    data.mkdir()
    good = "text,label\ngreat,positive\nawful,negative\n"
    _write(data, "header-only.csv", "text,label\n")
    _write(data, "empty.jsonl", "")
    _write(data, "latin1.csv", "text,label\ncaf\xe9 cr\xe8me,positive\nbad,negative\n".encode("latin-1"))
    _write(data, "ragged.csv", good + "too,many,fields\n")
    _write(data, "bad-quote.csv", good + '"unclosed,positive\n')
    _write(data, "broken.json", '[{"text": "great", "label": "positive"},')
    _write(data, "broken.jsonl", '{"text": "great", "label": "positive"}\n{"text": \n')
    _write(data, "scalars.json", "[1, 2, 3]")
    _write(data, "empty-text.csv", good + "  ,positive\n")
    _write(data, "no-label.jsonl", '{"text": "great", "label": "positive"}\n{"text": "awful"}\n')
    _write(data, "one-class.csv", "text,label\ngreat,positive\nfine,positive\nnice,positive\n")
    _write(data, "scores.json", json.dumps([{"text": "great", "label": 0.9}, {"text": "awful", "label": 0.1}]))
    _write(data, "numbers.jsonl", '{"text": 5, "label": "positive"}\n{"text": "awful", "label": "negative"}\n')
    _write(data, "nested.jsonl", '{"text": "great", "label": ["a"]}\n{"text": "awful", "label": "negative"}\n')
    _write(data, "new-label.csv", "text,label\nso so,neutral\nfine,positive\n")
    _write(data, "one-row.csv", "text,label\ngreat,positive\n")
    _write(data, "notes.txt", "hello\n")
    two = "great,positive,{v}\nawful,negative,{v}\nnice,positive,{v}\nbad,negative,{v}\n"
    _write(data, "multi.csv", "text,label,task\n" + two.format(v="a") + two.format(v="b"))
    _write(data, "multi-one-class.csv", "text,label,task\n" + two.format(v="a") + "fine,positive,b\nok,positive,b\n")
    _write(data, "multi-one-row.csv", "text,label,task\n" + two.format(v="a") + "fine,positive,b\n")
    _write(data, "multi-eval-a.csv", "text,label,task\n" + two.format(v="a"))
    _write(data, "multi-eval-c.csv", "text,label,task\n" + two.format(v="a") + two.format(v="b") + "so so,negative,c\n")
    _write(data, "multi-eval-new.csv", "text,label,task\n" + two.format(v="a") + "meh,neutral,b\n")
    _write(data, "multi-no-value.csv", "text,label,task\ngreat,positive,a\nawful,negative,\n")
    _write(data, "multi-list.jsonl", '{"text": "great", "label": "positive", "task": ["a"]}\n')
    _write(data, "multi-all-bad.csv", "text,label,task\ngreat,positive,a\nnice,positive,a\nfine,positive,b\n")
    (root / "empty-model").mkdir()
    broken = root / "broken-model"
    broken.mkdir()
    _write(broken, "config.json", "{")
    adapter = root / "adapter"
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    rc, _, err = runner.run([*argv, "--output", str(adapter), "--max-steps", "2", "--batch-size", "8"], root, root)
    assert rc == 0, err
    moved = root / "moved-base"
    shutil.copytree(adapter, moved)
    run = json.loads((moved / "lntune_run.json").read_text())
    (moved / "lntune_run.json").write_text(json.dumps({**run, "base_model": str(root / "gone")}))
    corrupt = root / "corrupt-run"
    shutil.copytree(adapter, corrupt)
    _write(corrupt, "lntune_run.json", "{not json")
    return {**files, "root": str(root), "data": str(data), "adapter": str(adapter), "moved": str(moved)}


def _case_folder(tmp: Path, shared: dict) -> Path:
    """The case's working folder: the user's own folder, an earlier lntune run, a file, a link."""
    (tmp / "precious" / "sub").mkdir(parents=True)
    _write(tmp / "precious", "thesis.txt", "years of work\n")
    _write(tmp / "precious" / "sub", "data.bin", b"\x00\x01")
    shutil.copytree(shared["adapter"], tmp / "earlier-run")
    shutil.copytree(shared["adapter"], tmp / "earlier-run-plus")
    _write(tmp / "earlier-run-plus", "my-notes.txt", "mine\n")
    _write(tmp, "a-file", "x\n")
    (tmp / "link").symlink_to(tmp / "precious")
    (tmp / "deep").mkdir()  # the working folder of the '..' case
    return tmp


B = ["train", "--model", "{bert}", "--data"]
T = [*B, "{train}", "--eval-data", "{eval}"]
D = "{data}/"
CASES: dict[str, tuple[list[str], str]] = {
    # lntune train: numbers
    "lr nan": ([*T, "--lr", "nan"], "argument --lr: must be a finite number above 0, got nan"),
    "lr inf": ([*T, "--lr", "inf"], "must be a finite number above 0, got inf"),
    "lr zero": ([*T, "--lr", "0"], "must be a finite number above 0"),
    "lr negative": ([*T, "--lr", "-0.01"], "must be a finite number above 0"),
    "lr not a number": ([*T, "--lr", "fast"], "expected a number above 0, got 'fast'"),
    "epochs inf": ([*T, "--epochs", "inf"], "argument --epochs: must be a finite number above 0"),
    "epochs nan": ([*T, "--epochs", "nan"], "argument --epochs: must be a finite number above 0"),
    "epochs zero": ([*T, "--epochs", "0"], "argument --epochs: must be a finite number above 0"),
    "seed negative": ([*T, "--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
    "seed too large": ([*T, "--seed", "4294967296"], "must be from 0 to 4294967295"),
    "seed not whole": ([*T, "--seed", "1.5"], "argument --seed: expected a whole number"),
    "batch size zero": ([*T, "--batch-size", "0"], "argument --batch-size: must be above 0, got 0"),
    "batch size negative": ([*T, "--batch-size", "-8"], "argument --batch-size: must be above 0"),
    "max length zero": ([*T, "--max-length", "0"], "argument --max-length: must be above 0"),
    "max steps zero": ([*T, "--max-steps", "0"], "argument --max-steps: must be above 0"),
    "max steps negative": ([*T, "--max-steps", "-1"], "argument --max-steps: must be above 0"),
    "max length beyond the model": ([*T, "--max-length", "1000"], "the model takes at most 64 tokens per text"),
    # lntune train: the command line itself
    "unknown option": ([*T, "--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
    "unknown task": ([*T, "--task", "regression"], "argument --task: invalid choice: 'regression'"),
    "option without value": ([*T, "--lr"], "argument --lr: expected one argument"),
    "abbreviated option": ([*T, "--epoch", "1"], "unrecognized arguments: --epoch 1"),
    # lntune train: data
    "missing data file": (["train", "--model", "{bert}", "--data", "nope.csv"], "nope.csv: file not found"),
    "data is a folder": (["train", "--model", "{bert}", "--data", "{data}"], "is a folder"),
    "unknown file type": ([*B, D + "notes.txt"], ".csv, .json or .jsonl"),
    "csv header only": ([*B, D + "header-only.csv"], "the file has no examples"),
    "empty jsonl": ([*B, D + "empty.jsonl"], "the file has no examples"),
    "not utf-8": ([*B, D + "latin1.csv"], "not UTF-8 text"),
    "csv row with extra fields": ([*B, D + "ragged.csv"], "line 4 has 3 fields"),
    "csv unclosed quote": ([*B, D + "bad-quote.csv"], "not valid CSV"),
    "broken json": ([*B, D + "broken.json"], "not valid JSON"),
    "broken jsonl": ([*B, D + "broken.jsonl"], "line 2: not valid JSON"),
    "json of scalars": ([*B, D + "scalars.json"], "item 1 is not an object"),
    "missing column": ([*T, "--text-column", "review"], "no column 'review' (columns: text, label)"),
    "text and label the same": ([*T, "--text-column", "label"], "--text-column and --label-column are both 'label'"),
    "empty text": ([*B, D + "empty-text.csv"], "row 3 has no value in column 'text'"),
    "missing label": ([*B, D + "no-label.jsonl"], "row 2 has no value"),
    "one class": ([*B, D + "one-class.csv"], "only one class ('positive')"),
    "regression scores": ([*B, D + "scores.json"], "label 0.9"),
    "text is a number": ([*B, D + "numbers.jsonl"], "holds 5, not text"),
    "label is a list": ([*B, D + "nested.jsonl"], "is not a class name"),
    "unseen eval label": ([*T[:-1], D + "new-label.csv"], "labels ['neutral'] do not occur in the training data"),
    "eval data without data": (["train", "--model", "{bert}", "--eval-data", "{eval}"], "--eval-data needs --data"),
    "one example to split": ([*B, D + "one-row.csv"], "too few to hold out"),
    # lntune train --adapter-column: one adapter per value
    "adapter column missing": ([*T, "--adapter-column", "customer"], "no column 'customer' (columns: text, label)"),
    "adapter column is the label": ([*B, D + "multi.csv", "--adapter-column", "label"], "also the text or label"),
    "adapter column without data": (["train", "--model", "{bert}", "--adapter-column", "task"], "needs --data"),
    "adapter column for causal-lm": (
        [*B, D + "multi.csv", "--adapter-column", "task", "--task", "causal-lm"],
        "--adapter-column trains classifiers",
    ),
    "adapter value with one class": (
        [*B, D + "multi-one-class.csv", "--adapter-column", "task"],
        "value 'b' of column 'task' has only one class ('positive') in its 1 training example;",
    ),
    "adapter value with one example": (
        [*B, D + "multi-one-row.csv", "--adapter-column", "task"],
        "value 'b' of column 'task' has 1 example: too few to hold one out and train",
    ),
    "adapter value without held-out": (
        [*B, D + "multi.csv", "--eval-data", D + "multi-eval-a.csv", "--adapter-column", "task"],
        "value 'b' of column 'task' has no held-out examples in --eval-data",
    ),
    "held-out value without training": (
        [*B, D + "multi.csv", "--eval-data", D + "multi-eval-c.csv", "--adapter-column", "task"],
        "value 'c' of column 'task' has no training examples in --data",
    ),
    "adapter value with unseen held-out label": (
        [*B, D + "multi.csv", "--eval-data", D + "multi-eval-new.csv", "--adapter-column", "task"],
        "its held-out labels ['neutral'] do not occur in its training examples",
    ),
    "adapter value missing": ([*B, D + "multi-no-value.csv", "--adapter-column", "task"], "row 2 has no value in"),
    "adapter value is a list": ([*B, D + "multi-list.jsonl", "--adapter-column", "task"], "cannot name an adapter"),
    "every adapter value bad, skipped": (
        [*B, D + "multi-all-bad.csv", "--adapter-column", "task", "--skip-bad-adapters"],
        "no value can be trained ('a': one class, 'b': 1 example)",
    ),
    "skip-bad-adapters alone": ([*T, "--skip-bad-adapters"], "--skip-bad-adapters needs --adapter-column"),
    # lntune train: model
    "missing model": (["train", "--model", "nope", "--data", "{train}"], "--model nope: no such folder"),
    "model is a file": (["train", "--model", "{train}", "--data", "{train}"], "is a file"),
    "model without config": (["train", "--model", "{root}/empty-model", "--data", "{train}"], "no config.json"),
    "model with broken config": (["train", "--model", "{root}/broken-model", "--data", "{train}"], "cannot"),
    "no matching target": ([*T, "--target-modules", "nonorm"], "--target-modules"),
    # lntune train: output folder
    "output is a file": ([*T, "--output", "a-file"], "a file with that name exists"),
    "output is the user's folder": ([*T, "--output", "precious"], "lntune did not write it"),
    "output is the user's, with --overwrite": ([*T, "--output", "precious", "--overwrite"], "did not write it"),
    "output is an earlier run": ([*T, "--output", "earlier-run"], "add --overwrite to replace it"),
    "earlier run with user's files": ([*T, "--output", "earlier-run-plus", "--overwrite"], "(my-notes.txt)"),
    "output is the current folder": ([*T, "--output", "."], "is the current folder or contains it"),
    "output is the parent folder": ([*T, "--output", ".."], "is the current folder or contains it"),
    "output is the root": ([*T, "--output", "/"], "is the root folder"),
    "output inside a file": ([*T, "--output", "a-file/out"], "is a file, not a folder"),
    "output is a symlink": ([*T, "--output", "link"], "is a symbolic link"),
    "resume with nothing to resume": ([*T, "--output", "new", "--resume"], "no interrupted run"),
    # lntune eval
    "eval batch size zero": (["eval", "--adapter", "{adapter}", "--data", "{eval}", "--batch-size", "0"], "above 0"),
    "eval batch size negative": (["eval", "--adapter", "{adapter}", "--data", "{eval}", "--batch-size", "-3"], "0"),
    "eval without data": (["eval", "--adapter", "{adapter}"], "the following arguments are required: --data"),
    "eval missing adapter": (["eval", "--adapter", "nope", "--data", "{eval}"], "--adapter nope: no such folder"),
    "eval model folder as adapter": (["eval", "--adapter", "{bert}", "--data", "{eval}"], "no adapter_config.json"),
    "eval corrupt run file": (["eval", "--adapter", "{root}/corrupt-run", "--data", "{eval}"], "not valid JSON"),
    "eval base model gone": (["eval", "--adapter", "{moved}", "--data", "{eval}"], "is not a local folder"),
    "eval other base model": (["eval", "--adapter", "{adapter}", "--data", "{eval}", "--model", "{llama}"], "fit"),
    "eval missing data": (["eval", "--adapter", "{adapter}", "--data", "nope.csv"], "file not found"),
    "eval missing column": (["eval", "--adapter", "{adapter}", "--data", "{jsonl}"], "no column 'label'"),
    "eval unseen label": (["eval", "--adapter", "{adapter}", "--data", D + "new-label.csv"], "error: --data "),
    "eval abbreviated option": (["eval", "--adapt", "{adapter}", "--data", "{eval}"], "required: --adapter"),
    # lntune inspect
    "inspect missing model": (["inspect", "--model", "nope"], "--model nope: no such folder"),
    "inspect no matching target": (["inspect", "--model", "{bert}", "--target-modules", "nonorm"], "--target-modules"),
    "inspect unknown task": (["inspect", "--model", "{bert}", "--task", "nope"], "invalid choice"),
    "inspect num labels zero": (["inspect", "--model", "{bert}", "--num-labels", "0"], "--num-labels: must be above"),
    "inspect data and num labels": (["inspect", "--model", "{bert}", "--data", "{train}", "--num-labels", "3"], "one"),
    "inspect data without labels": (["inspect", "--model", "{bert}", "--data", "{jsonl}"], "no column 'label'"),
    "inspect data of one class": (["inspect", "--model", "{bert}", "--data", D + "one-class.csv"], "one class"),
    # lntune merge
    "merge without output": (["merge", "--adapter", "{adapter}"], "the following arguments are required: --output"),
    "merge missing adapter": (["merge", "--adapter", "nope", "--output", "m"], "--adapter nope: no such folder"),
    "merge into the user's folder": (["merge", "--adapter", "{adapter}", "--output", "precious"], "did not write"),
    "merge into an earlier run": (["merge", "--adapter", "{adapter}", "--output", "earlier-run"], "--overwrite"),
    "merge onto its adapter": (["merge", "--adapter", "earlier-run", "--output", "earlier-run/"], "is the --adapter"),
    "merge into the current folder": (["merge", "--adapter", "{adapter}", "--output", "."], "is the current folder"),
    # lntune itself
    "no command": ([], "the following arguments are required: command"),
    "unknown command": (["fit"], "invalid choice: 'fit'"),
}


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` (links not followed): a file's size and modification time."""
    seen = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            seen.update({str(Path(folder, name)): (0, 0) for name in dirs})
            for name in names:
                info = Path(folder, name).lstat()
                seen[str(Path(folder, name))] = (info.st_size, info.st_mtime_ns)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(runner, shared, tmp_path, case):
    argv, message = CASES[case]
    argv = [word.format(**shared) for word in argv]
    cwd = _case_folder(tmp_path / "cwd", shared)
    if case == "output is the parent folder":
        cwd = cwd / "deep"
    logs = tmp_path / "logs"
    logs.mkdir()
    before = _tree(tmp_path / "cwd", Path(shared["root"]))
    rc, out, err = runner.run(argv, cwd, logs)
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    command = argv[0] if argv and argv[0] in ("train", "eval", "inspect", "merge") else ""
    assert lines[0].startswith(f"lntune {command}".rstrip() + ": error: ") and message in lines[0], lines[0]
    assert out == ""
    assert _tree(tmp_path / "cwd", Path(shared["root"])) == before  # nothing written, moved or deleted
