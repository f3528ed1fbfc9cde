"""Output folders of ``lntune train`` and ``lntune merge``: nothing lost, nothing half-written.

* The destination is checked before any work: a path that can never be renamed into place (``.``,
  ``..``, ``/``, a file) is refused, and so is an existing folder lntune did not write. A folder lntune
  wrote (it holds a marker file listing its files) is replaced only with ``--overwrite``, and only
  when it holds nothing else.
* One run at a time per destination: a lock file ``.NAME.lock`` beside it, held with ``fcntl.flock``.
* The result is built in a hidden work folder ``.NAME.partial`` beside the destination, which keeps an
  interrupted training run's checkpoints for ``--resume``, and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from lntune.cli.common import CLIError, is_main_process
from lntune.run_record import RUN_FILE

#: Marker of a folder written by ``lntune merge`` (``lntune train``'s is `RUN_FILE`).
MERGE_FILE = "lntune_merge.json"

#: In the work folder: which command made it, with which settings, and what it measured before training.
WORK_FILE = "lntune_work.json"

#: What a training run writes in its output folder besides the adapter's files.
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training_curves.png"

#: Every name a run writes at the top of its output folder: an ``--adapter-column`` value spelled like one
#: (in any case) gets another folder name, so that it never meets the run's own files.
RUN_NAMES = frozenset({RUN_FILE, MERGE_FILE, WORK_FILE, CHECKPOINTS, METRICS_FILE, PLOT_FILE})

_MARKERS = (RUN_FILE, MERGE_FILE)


def work_dir(output: Path) -> Path:
    """The hidden work folder next to ``output`` where a run writes until it renames it to ``output``."""
    return output.parent / f".{output.name}.partial"


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def written_by_lntune(folder: Path) -> set[str] | None:
    """Names of the entries lntune wrote in ``folder`` (from its marker file), or None without a marker."""
    for marker in _MARKERS:
        record = read_json(folder / marker)
        if record is not None:
            return {marker, *(str(name) for name in record.get("files", []))}
    return None


def check_destination(output: Path, flag: str) -> None:
    """Refuse a destination that can never become the result folder, before any work.

    Args:
        output: The folder to write.
        flag: The option that named it, for error messages.
    """
    absolute = Path(os.path.abspath(output))
    if absolute.name == "":
        raise CLIError(f"{flag} {output}: is the root folder; name a new folder, such as lntune-output.")
    here = Path.cwd().resolve()
    target = absolute.parent.resolve() / absolute.name
    if target == here or target in here.parents:
        raise CLIError(
            f"{flag} {output}: is the current folder or contains it; name a new folder, such as lntune-output."
        )
    if output.is_symlink():
        raise CLIError(f"{flag} {output}: is a symbolic link; name the folder itself, or a new one.")
    if output.exists() and not output.is_dir():
        raise CLIError(f"{flag} {output}: a file with that name exists; pass a folder path.")
    parent = absolute.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {output}: {parent} is a file, not a folder.")


def check_replaceable(output: Path, flag: str, overwrite: bool) -> None:
    """Refuse an existing ``output`` unless it is empty, or an lntune result that ``--overwrite`` may replace.

    Args:
        output: The folder to write.
        flag: The option that named it, for error messages.
        overwrite: The user allowed replacing an earlier lntune result.
    """
    if not output.is_dir():
        return
    entries = sorted(entry.name for entry in output.iterdir())
    if not entries:
        return
    ours = written_by_lntune(output)
    if ours is None:
        raise CLIError(
            f"{flag} {output}: the folder exists and lntune did not write it; lntune never deletes "
            f"what it did not write: choose a new {flag}."
        )
    if not overwrite:
        raise CLIError(
            f"{flag} {output}: holds an earlier lntune result; add --overwrite to replace it, or choose a new {flag}."
        )
    foreign = [name for name in entries if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CLIError(
            f"{flag} {output}: holds files lntune did not write ({shown}); move them out, or choose a new {flag}."
        )


class OutputFolder:
    """The destination of one command run: checked and locked on entry, built in a work folder, published.

    Use it as a context manager around the whole command: entering checks the destination and takes
    the lock; leaving releases the lock and, if the command failed before it published, removes the
    parent folders it created (the work folder is the caller's: ``train`` keeps it for ``--resume``).
    Only rank 0 (see `is_main_process`) locks and writes.

    Args:
        path: The ``--output`` value.
        overwrite: ``--overwrite``: an earlier lntune result there may be replaced.
        flag: The option name, for error messages.

    Example:
        >>> with OutputFolder("merged") as out:
        ...     out.create_work("merge", {})
        ...     model.save_pretrained(out.work)
        ...     out.publish(MERGE_FILE, {"adapter": "lntune-output"})
    """

    def __init__(self, path: str, overwrite: bool = False, flag: str = "--output") -> None:
        self.path = Path(path)
        self.work = work_dir(self.path)
        self.flag = flag
        self.overwrite = overwrite
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self._lock = self.path.parent / f".{self.path.name}.lock"
        self._published = False
        self._work_created = False

    def __enter__(self) -> OutputFolder:
        check_destination(self.path, self.flag)
        if not is_main_process():
            return self
        try:
            self._make_parents()
            self._take_lock()
            check_replaceable(self.path, self.flag, self.overwrite)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(self._lock_fd), os.stat(self._lock)):
                    self._lock.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self._published:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty

    def _make_parents(self) -> None:
        missing = []
        parent = Path(os.path.abspath(self.path)).parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as exc:
                raise CLIError(f"{self.flag} {self.path}: cannot create {folder} ({exc.strerror}).") from None
            self._created.append(folder)

    def _take_lock(self) -> None:
        while True:
            try:
                fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                where = self._lock.parent
                raise CLIError(f"{self.flag} {self.path}: cannot write in {where} ({exc.strerror}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CLIError(
                    f"{self.flag} {self.path}: another lntune run (process {holder}) is writing it; wait for it to "
                    f"finish, or choose another {self.flag}."
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self._lock))
            except FileNotFoundError:
                same = False  # the previous holder removed it as we opened it: take a fresh one
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def work_state(self) -> dict | None:
        """What the work folder's `WORK_FILE` records (command, settings, before-training metrics), or None."""
        return read_json(self.work / WORK_FILE)

    def check_work(self, command: str, resume: bool = False) -> dict | None:
        """Check, changing nothing, that the work folder can be used; return the state of a run to resume.

        Args:
            command: ``train`` or ``merge``.
            resume: Continue the interrupted run kept in the work folder (``train --resume``).

        Returns:
            With ``resume``, the kept run's state; otherwise None.
        """
        if not is_main_process():
            return self.work_state() if resume else None
        state = self.work_state()
        exists = self.work.is_dir()
        if exists and state is None and any(self.work.iterdir()):
            raise CLIError(
                f"{self.flag} {self.path}: {self.work} exists and lntune did not write it (no {WORK_FILE}); move it "
                "out of the way."
            )
        if resume:
            if state is None or state.get("command") != command:
                raise CLIError(f"--resume: no interrupted run in {self.work}; start without --resume.")
            return state
        if state is not None and state.get("command") == "train" and not self.overwrite:
            raise CLIError(
                f"{self.flag} {self.path}: an interrupted run is kept in {self.work}; add --resume to continue it, "
                "or --overwrite to start over."
            )
        return None

    def create_work(self, command: str, settings: dict) -> None:
        """Start an empty work folder (replacing one that `check_work` allowed) and record ``settings``."""
        if not is_main_process():
            return
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir()
        self._work_created = True
        self.save_state({"command": command, "settings": settings})

    def discard_work(self) -> None:
        """Remove the work folder if this run created it (a failed or interrupted run that kept nothing)."""
        if self._work_created and is_main_process():
            shutil.rmtree(self.work, ignore_errors=True)
            self._work_created = False

    def save_state(self, state: dict) -> None:
        """Write ``state`` as the work folder's `WORK_FILE` (rank 0 only)."""
        if is_main_process():
            (self.work / WORK_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    def publish(self, marker: str, record: dict) -> None:
        """Write the marker file, then move the work folder to the destination (replacing an earlier result).

        Args:
            marker: `RUN_FILE` or `MERGE_FILE`.
            record: What the marker says about the result; ``files`` (every entry written) is added.
        """
        if not is_main_process():
            return
        (self.work / WORK_FILE).unlink(missing_ok=True)
        files = sorted({entry.name for entry in self.work.iterdir()} | {marker})
        (self.work / marker).write_text(json.dumps({**record, "files": files}, indent=2) + "\n", encoding="utf-8")
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            self.path.rename(old)
        self.work.rename(self.path)
        self._published = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
