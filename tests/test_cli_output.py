"""``lntune train`` / ``merge`` output folders: never delete what lntune did not write, one run per folder,
an interrupted run is kept until the user resumes it or starts over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from test_cli import tiny_files

from lntune.cli import main
from lntune.cli.output import MERGE_FILE, OutputFolder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return tiny_files(tmp_path_factory.mktemp("out"))


def _train(files: dict, output: Path, *extra: str) -> int:
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    return main([*argv, "--output", str(output), "--max-steps", "2", "--batch-size", "8", *extra])


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_user_folder_is_refused_and_kept_byte_for_byte(files, tmp_path, capsys):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.txt").write_text("years of work\n")
    (precious / "sub" / "notes.txt").write_text("more\n")
    for extra in ([], ["--overwrite"]):
        assert _train(files, precious, *extra) == 2
        assert "lntune did not write it" in capsys.readouterr().err
    assert (precious / "thesis.txt").read_text() == "years of work\n" and (precious / "sub" / "notes.txt").exists()
    assert _entries(tmp_path) == ["precious"]  # no work folder, no lock file


def test_empty_folder_is_used_and_an_earlier_run_is_replaced_only_with_overwrite(files, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    assert _train(files, output) == 0
    first = json.loads((output / "metrics.json").read_text())
    assert _train(files, output, "--lr", "0.02") == 2
    assert "add --overwrite to replace it" in capsys.readouterr().err
    assert json.loads((output / "metrics.json").read_text()) == first
    assert _train(files, output, "--lr", "0.02", "--overwrite") == 0
    assert json.loads((output / "metrics.json").read_text())["learning_rate"] == 0.02
    assert _entries(tmp_path) == ["run"]  # the old result, the work folder and the lock are gone


def test_a_second_run_on_a_locked_output_is_refused_with_one_line(files, tmp_path, capsys):
    output = tmp_path / "run"
    with OutputFolder(str(output)) as first:  # what a running `lntune train --output run` holds
        first.create_work("train", {})
        assert _train(files, output) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another lntune run (process " in err[0] and "is writing it" in err[0], err
        assert (first.work / "lntune_work.json").exists()  # the first run's work folder is untouched
        first.discard_work()
    assert _entries(tmp_path) == []  # the lock file goes with the run that held it
    assert _train(files, output) == 0


class _Stop(transformers.TrainerCallback):
    """Raise KeyboardInterrupt (a second Ctrl-C) after the checkpoint of step 1."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_an_interrupted_run_is_kept_until_resumed_or_overwritten(files, tmp_path, capsys):
    from lntune.cli import build_parser
    from lntune.cli.common import Interrupted
    from lntune.cli.train import run_train

    output = tmp_path / "run"
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--output", str(output), "--max-steps", "4", "--batch-size", "8"]
    with pytest.raises(Interrupted):
        run_train(build_parser().parse_args(argv), callbacks=[_Stop()])
    work = tmp_path / ".run.partial"
    assert (work / "checkpoints" / "checkpoint-1").is_dir()
    assert main(argv) == 2
    assert "an interrupted run is kept in" in capsys.readouterr().err
    assert main([*argv, "--resume", "--lr", "0.02"]) == 2
    err = capsys.readouterr().err  # no --lr: the rate came from the rule
    assert "the interrupted run was started with no --lr, this one with --lr 0.02" in err
    assert main([*argv[:-4], *argv[-2:], "--resume"]) == 2  # without --max-steps 4
    err = capsys.readouterr().err
    assert "started with --max-steps 4, this one with no --max-steps;" in err and "None" not in err
    assert (work / "checkpoints" / "checkpoint-1").is_dir()
    assert main([*argv, "--overwrite"]) == 0  # starts over
    assert not work.exists() and json.loads((output / "metrics.json").read_text())["train_steps"] == 4


def test_merge_marks_its_output_and_replaces_it_only_with_overwrite(files, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert _train(files, adapter) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    record = json.loads((merged / MERGE_FILE).read_text())
    assert record["adapter"] == str(adapter) and sorted(record["files"]) == _entries(merged)
    assert "config.json" in record["files"]
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "add --overwrite" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged), "--overwrite"]) == 0
    assert _entries(tmp_path) == ["adapter", "merged"]


def test_missing_parent_folders_are_created_and_removed_again_on_bad_input(files, tmp_path, capsys):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\ngreat,positive\nfine,positive\n")
    argv = ["train", "--model", files["bert"], "--data", str(one_class), "--output", str(tmp_path / "a" / "b" / "c")]
    assert main(argv) == 2
    assert "only one class" in capsys.readouterr().err
    assert _entries(tmp_path) == ["one.csv"]
    assert _train(files, tmp_path / "a" / "b" / "c") == 0
    assert (tmp_path / "a" / "b" / "c" / "adapter_model.safetensors").exists()
