"""Atomic file writes: a temporary file in the same folder, then a rename.

A leaf module (standard library only): the config, the checkpoint files, the model card and the command
line's records all write through it, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile


def _new_file_mode(path: str) -> int:
    """The permissions ``open(path, "w")`` would give: the old file's, else ``0o666`` minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    An interrupted or failed write leaves any previous file at ``path`` byte-identical and no temporary
    file behind. The new file gets the permissions a plain ``open(path, "w")`` would give.

    Args:
        path: The file to (over)write; its folder must exist.
        data: The complete new contents.

    Example:
        >>> atomic_write_bytes("out/adapter_config.json", b"{}")
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
