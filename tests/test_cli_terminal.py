"""``lntune train`` as a user at a terminal sees it: the progress bar, then Ctrl-C, then the resume command.

The command runs as its own process with stderr on a pseudo-terminal (so ``isatty()`` is true, as in
a shell); the test reads what the terminal shows and presses Ctrl-C (SIGINT) once the bar moves.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from test_cli import tiny_files

STEPS = 200  # long enough to press Ctrl-C before the first scheduled checkpoint (step 50)
BAR = re.compile(rf"(\d+)/{STEPS} \[")  # tqdm's "  3%|▎   | 7/200 [00:00<00:06, 31.1it/s]"


def _read_until(fd: int, proc: subprocess.Popen, done, timeout: float) -> str:
    """Read the terminal until ``done(text)`` or the process exits; fail after ``timeout`` seconds."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the terminal did not show what was expected in {timeout} s:\n{text[-2000:]}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed: the process exited
                break
            text += chunk.decode(errors="replace")
        elif proc.poll() is not None:
            break
    return text


def test_bar_in_a_terminal_ctrl_c_keeps_a_checkpoint_and_the_printed_command_resumes(tmp_path):
    files = tiny_files(tmp_path)
    argv = ["train", "--model", files["bert"], "--data", files["train"], "--eval-data", files["eval"]]
    argv += ["--output", "run", "--max-steps", str(STEPS), "--batch-size", "4", "--max-length", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "lntune", *argv], stdout=subprocess.PIPE, stderr=follower, cwd=tmp_path, env=env
    )
    os.close(follower)
    try:
        shown = _read_until(leader, proc, lambda text: any(int(n) >= 1 for n in BAR.findall(text)), timeout=300)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        shown += _read_until(leader, proc, lambda text: False, timeout=120)
        assert proc.wait(timeout=60) == 130, shown[-2000:]
    finally:
        os.close(leader)
    assert proc.stdout.read() == b""
    assert "Traceback" not in shown and "it/s]" in shown  # the bar, on stderr
    said = [line.strip() for line in shown.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(said) == 1, shown[-2000:]
    match = re.fullmatch(r"lntune train: interrupted; the checkpoint of step (\d+) of (\d+) is kept in (\S+); "
                         r"resume with: (.+)", said[0])  # fmt: skip
    assert match, said[0]
    step, total, work, command = int(match[1]), int(match[2]), Path(tmp_path, match[3]), match[4]
    assert total == STEPS and 1 <= step < STEPS // 4  # saved on Ctrl-C, before the first scheduled checkpoint
    assert (work / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").exists()
    before = re.search(rf"\s0/{STEPS}\s+-\s+(\d\.\d+)", shown)  # the evaluation line before training
    assert before, shown[:2000]

    words = shlex.split(command)
    assert words[0] == "lntune" and words[1:] == [*argv, "--resume"]
    done = subprocess.run(
        [sys.executable, "-m", "lntune", *words[1:]], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and "it/s" not in done.stderr  # stderr is not a terminal: no bar, no log dicts
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == STEPS
    assert f"{metrics['eval_loss_before']:.4f}" == before[1]  # the numbers before training survive the stop
    assert not work.exists()
