"""`AdapterCatalog`: which adapters the ``--adapters`` folder holds, found by name, kept inside that folder.

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``): every
such subfolder of ``--adapters`` (named by the subfolder), and ``--adapters`` itself when it is one (named
by the folder, as ``lntune train`` writes ``lntune-output``). Lookups read the folder on each request (a few
``stat`` calls), so folders added, changed or removed while the server runs are seen at once; what is read
from an adapter's files is cached until they change. Names and paths that leave ``--adapters`` (``..``,
absolute paths elsewhere, symlinks out) are refused.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lntune.checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from lntune.config import CONFIG_NAME, LNTuningConfig
from lntune.run_record import RUN_FILE, RunRecord
from lntune.serve.errors import APIError, adapter_failed, bad_request, not_found
from lntune.tasks import task_named, task_of_type

_WEIGHT_FILES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)

logger = logging.getLogger(__name__)

#: ``config.json`` fields that name, date or label a model without changing what it computes (ignored when
#: two model folders are compared by `same_base_model`).
_NAME_FIELDS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "torch_dtype",
        "dtype",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
    }
)


@dataclass(frozen=True)
class AdapterSource:
    """One adapter as read from its folder.

    Args:
        name: The adapter's name in the API.
        folder: Its folder (inside ``--adapters``).
        generation: Increases each time the catalog (re)reads an adapter: a resident copy older than the
            source a request names is reloaded.
        fingerprint: Sizes and modification times of its files (a change means a new version).
        num_labels: The classifier head's output size (``seq-cls``; None if the file has no head).
        labels: Label names, one per class (``seq-cls``).
        max_length: The tokens per text it was trained with (``max_length`` in its ``lntune_run.json``): its
            inputs are truncated there, as training and ``lntune eval`` did. None if not recorded.
    """

    name: str
    folder: Path
    generation: int
    fingerprint: tuple
    num_labels: int | None = None
    labels: tuple[str, ...] | None = None
    max_length: int | None = None


def check_name(name: str) -> None:
    """Raise a 400 unless ``name`` can name a folder directly inside ``--adapters``."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise bad_request(
            f"Invalid adapter name {name!r}: use the name of a folder inside --adapters (no '/', '\\', leading "
            "'.' or '..').",
            param="model",
            code="invalid_adapter_name",
        )


def _stat_key(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _weights_file(folder: Path) -> Path | None:
    return next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder`` holds ``adapter_config.json`` and a weights file."""
    return (folder / CONFIG_NAME).is_file() and _weights_file(folder) is not None


def adapter_folders(root: Path) -> list[Path]:
    """The adapter folders of ``root``: ``root`` itself if it is one, then its subfolders that are (hidden ones
    left out), sorted by name."""
    try:
        children = sorted(c for c in root.iterdir() if not c.name.startswith(".")) if root.is_dir() else []
    except OSError:
        children = []
    return [folder for folder in (root, *children) if is_adapter_folder(folder)]


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """``{key: shape}`` of a weights file, reading only the header of a safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {key: list(value.shape) for key, value in state.items()}
    except Exception as exc:  # safetensors and torch.load raise many types for broken files
        raise adapter_failed(f"Cannot read adapter weights {path}: {exc}") from None


def head_size(weights: Path, head_modules: tuple[str, ...]) -> int | None:
    """The number of classes of the classifier head saved in ``weights`` (None if it has none).

    The head is the last linear layer under one of ``head_modules`` (``classifier`` or ``score`` for
    classification: `lntune.tasks`; ``out_proj`` of RoBERTa-style heads).

    Example:
        >>> head_size(Path("lntune-output/adapter_model.safetensors"), ("classifier", "score"))
        2
    """
    heads = set(head_modules)
    keys = [
        (key, shape)
        for key, shape in _weight_shapes(weights).items()
        if len(shape) == 2 and key.endswith(".weight") and heads & set(key.split(".")[:-1])
    ]
    keys.sort(key=lambda item: not item[0].endswith("out_proj.weight"))
    return keys[0][1][0] if keys else None


def label_names(num_labels: int, base_labels: dict[int, str], trained: list | tuple | None = None) -> tuple[str, ...]:
    """Names of ``num_labels`` classes: ``trained`` (as recorded in training) if it fits, else the base
    model config's ``id2label`` if it fits, else ``LABEL_0``, ``LABEL_1``...

    Example:
        >>> label_names(2, {0: "LABEL_0", 1: "LABEL_1"}, ["negative", "positive"])
        ('negative', 'positive')
    """
    if isinstance(trained, (list, tuple)) and len(trained) == num_labels:
        return tuple(str(label) for label in trained)
    if len(base_labels) == num_labels:
        return tuple(base_labels[i] for i in range(num_labels))
    return tuple(f"LABEL_{i}" for i in range(num_labels))


def _config_fields(folder: str | Path) -> dict | None:
    """The fields of ``folder/config.json`` that define the model (see `_NAME_FIELDS`), None if unreadable."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if k not in _NAME_FIELDS} if isinstance(data, dict) else None


def _last_name(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def same_base_model(recorded: str | None, served_path: str | Path, served_id: str | None = None) -> bool:
    """Whether an adapter whose record names the base model ``recorded`` fits the model served from ``served_path``.

    The rule, first match wins:

    1. nothing recorded: yes (nothing says otherwise);
    2. ``recorded`` is the served folder (the same real path): yes;
    3. ``recorded`` is a local model folder: yes if its ``config.json`` and the served one agree on every field
       both have, apart from names, versions, dtype and labels (`_NAME_FIELDS`): a copy of the model, or the
       same model saved by another Transformers version;
    4. otherwise (a Hub id, or a path of another machine): yes if its last component is the served folder's
       name or the served model's id (``sentence-transformers/all-MiniLM-L6-v2`` fits ``all-MiniLM-L6-v2``).

    Example:
        >>> same_base_model("sentence-transformers/all-MiniLM-L6-v2", "/models/all-MiniLM-L6-v2")
        True
    """
    if not recorded:
        return True
    served = Path(served_path)
    if os.path.exists(recorded):
        try:
            if os.path.samefile(recorded, served):
                return True
        except OSError:
            pass
        mine, theirs = _config_fields(recorded), _config_fields(served)
        if mine is not None and theirs is not None:
            shared = mine.keys() & theirs.keys()
            return all(mine[k] == theirs[k] for k in shared) and mine.get("model_type") == theirs.get("model_type")
    names = {Path(os.path.abspath(served)).name.lower(), (served_id or "").lower()} - {""}
    return _last_name(recorded) in names


class AdapterCatalog:
    """The adapters of one ``--adapters`` folder, by name.

    Args:
        root: The ``--adapters`` folder.
        base_model_id: The base model's name (never an adapter's).
        task: The server's task; adapters saved for another task are refused with a clear error.
        base_labels: The base model's label names by class index (``seq-cls``), used when an adapter's
            ``lntune_run.json`` does not name its labels.
        base_model_path: The served model's folder: adapters recorded for another base model
            (`same_base_model`) are left out of `names` (with one warning each) and refused with 400.
            None: not checked.

    Example:
        >>> catalog = AdapterCatalog(Path("adapters"), "all-MiniLM-L6-v2", "feature-extraction")
        >>> catalog.resolve("my-adapter").folder
        PosixPath('adapters/my-adapter')
    """

    def __init__(
        self,
        root: Path,
        base_model_id: str,
        task: str,
        base_labels: dict[int, str] | None = None,
        base_model_path: str | Path | None = None,
        allow_any_path: bool = False,
    ) -> None:
        self.root = Path(root)
        self.allow_any_path = allow_any_path
        self._outside: set[str] = set()  # names registered from a folder outside root (with allow_any_path)
        self.base_model_id = base_model_id
        self.task = task_named(task)
        self.base_labels = dict(base_labels or {})
        self.base_model_path = base_model_path
        self._verdicts: dict[str, tuple[tuple, APIError | None]] = {}
        self._warned: set[tuple[str, tuple]] = set()
        self._real_root = self.root.resolve()
        self._registered: dict[str, Path] = {}
        self._hidden: set[str] = set()
        self._known: dict[str, AdapterSource] = {}
        self._generations = itertools.count(1)

    # ----------------------------------------------------------------------------- listing
    def names(self) -> list[str]:
        """The names of every adapter that can be served now (folders found plus adapters registered).

        Adapters saved for another task or recorded for another base model are left out; each is named in one
        warning (once per version of its files), and a request for it gets a 400 saying why.
        """
        found = {folder.name: folder for folder in adapter_folders(self.root) if self._inside(folder)}
        found.update(self._registered)
        hidden = self._hidden | {self.base_model_id}
        return [n for n, folder in found.items() if n not in hidden and self._refusal(n, folder) is None]

    # ----------------------------------------------------------------------------- lookups
    def resolve(self, name: str) -> AdapterSource | None:
        """The adapter ``name`` as its folder holds it now; None for the base model's name.

        Raises:
            APIError: 400 for a name or folder outside ``--adapters`` or an adapter of another task, 404 if no
                such adapter exists, 500 if its files cannot be read (naming the file).
        """
        if name == self.base_model_id:
            return None
        check_name(name)
        if name in self._hidden:
            raise not_found(
                f"The adapter '{name}' was unloaded with DELETE /v1/adapters/{name}; POST /v1/adapters "
                f'{{"name": "{name}", "path": ...}} to serve it again.'
            )
        folder = self._registered.get(name) or self._folder_of(name)
        config = folder / CONFIG_NAME
        weights = _weights_file(folder)
        config_key = _stat_key(config)
        if config_key is None:
            raise not_found(
                f"The model '{name}' does not exist: it is not the base model '{self.base_model_id}' and "
                f"{self.root} has no adapter folder '{name}' (with {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME} "
                "or .bin). GET /v1/models lists the models served."
            )
        if weights is None:
            raise adapter_failed(f"Adapter '{name}': {folder} has {CONFIG_NAME} but no {' or '.join(_WEIGHT_FILES)}.")
        fingerprint = (config_key, str(weights), _stat_key(weights), _stat_key(folder / RUN_FILE))
        known = self._known.get(name)
        if known is not None and known.folder == folder and known.fingerprint == fingerprint:
            return known
        refusal = self._refusal(name, folder)
        if refusal is not None:
            raise refusal
        source = self._read(name, folder, weights, fingerprint)
        self._known[name] = source
        return source

    def register(self, name: str, path: str) -> AdapterSource:
        """Serve the adapter folder ``path`` (inside ``--adapters``) as ``name`` (``POST /v1/adapters``).

        Returns:
            The new source, with a new generation even if the files are unchanged (so that it is reloaded).
        """
        check_name(name)
        if name == self.base_model_id:
            raise bad_request(f"'{name}' is the base model's name; choose another adapter name.", param="name")
        folder = self.root / path  # an absolute path replaces the root; _inside then decides
        outside = not self._inside(folder)
        if outside and not self.allow_any_path:
            raise bad_request(
                f"path {path!r} leaves --adapters ({self.root}); adapters load from inside it unless the server runs "
                "with --allow-any-adapter-path.",
                param="path",
                code="path_outside_adapters",
            )
        if not (folder / CONFIG_NAME).is_file():
            raise bad_request(f"path {path!r}: {folder} has no {CONFIG_NAME}; not an adapter folder.", param="path")
        before = self.snapshot(name), name in self._outside
        self._registered[name] = folder
        self._hidden.discard(name)
        self._known.pop(name, None)
        if outside:
            self._outside.add(name)
        else:
            self._outside.discard(name)
        try:
            return self.resolve(name)
        except APIError:
            self.restore(name, before[0])
            if before[1]:
                self._outside.add(name)
            else:
                self._outside.discard(name)
            raise

    def exists(self, name: str) -> bool:
        """Whether ``name`` is an adapter this catalog serves now (a folder found or an adapter registered)."""
        return name in self.names()

    def snapshot(self, name: str) -> tuple:
        """What the catalog knows of ``name`` now, for `restore`."""
        return self._registered.get(name), name in self._hidden, self._known.get(name)

    def restore(self, name: str, snapshot: tuple) -> None:
        """Put back what `snapshot` took (a registration whose adapter failed to load is undone)."""
        folder, hidden, known = snapshot
        for table, value in ((self._registered, folder), (self._known, known)):
            if value is None:
                table.pop(name, None)
            else:
                table[name] = value
        if hidden:
            self._hidden.add(name)
        else:
            self._hidden.discard(name)

    def forget(self, name: str) -> None:
        """Stop serving ``name`` until it is registered again (``DELETE /v1/adapters/{name}``)."""
        check_name(name)
        exists = name in self._registered or (self._folder_of(name) / CONFIG_NAME).is_file()
        if name == self.base_model_id or name in self._hidden or not exists:
            raise not_found(f"No adapter '{name}' to unload; GET /v1/models lists the models served.")
        self._registered.pop(name, None)
        self._known.pop(name, None)
        self._outside.discard(name)
        self._hidden.add(name)

    # ----------------------------------------------------------------------------- helpers
    def _folder_of(self, name: str) -> Path:
        child = self.root / name
        if not child.exists() and name == self.root.name:
            return self.root
        return child

    def _inside(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return real == self._real_root or self._real_root in real.parents

    def _read(self, name: str, folder: Path, weights: Path, fingerprint: tuple) -> AdapterSource:
        for path in (folder, folder / CONFIG_NAME, weights):
            if name not in self._outside and not self._inside(path):
                raise bad_request(
                    f"Adapter '{name}': {path} leads outside --adapters ({self.root}) through a symlink; refused.",
                    code="path_outside_adapters",
                )
        try:
            config = LNTuningConfig.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as exc:
            raise adapter_failed(f"Adapter '{name}': cannot read {folder / CONFIG_NAME}: {exc}") from None
        try:
            record = RunRecord.read(folder, config)
        except ValueError as exc:
            raise adapter_failed(f"Adapter '{name}': {exc}") from None
        max_length = record.max_length if isinstance(record.max_length, int) and record.max_length > 0 else None
        num_labels = labels = None
        if self.task.classifies:
            num_labels = head_size(weights, self.task.head_modules)
            if num_labels is not None:
                labels = label_names(num_labels, self.base_labels, record.labels)
        return AdapterSource(name, folder, next(self._generations), fingerprint, num_labels, labels, max_length)

    def _refusal(self, name: str, folder: Path) -> APIError | None:
        """Why the adapter in ``folder`` cannot be served by this server (another task, another base model), or
        None. The verdict is kept until its files change; the first refusal of each version is logged once."""
        key = (str(folder), _stat_key(folder / CONFIG_NAME), _stat_key(folder / RUN_FILE))
        cached = self._verdicts.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        refusal = self._check(name, folder)
        self._verdicts[name] = (key, refusal)
        if refusal is not None and (name, key) not in self._warned:
            self._warned.add((name, key))
            logger.warning("lntune serve: adapter '%s' left out: %s", name, refusal.message)
        return refusal

    def _check(self, name: str, folder: Path) -> APIError | None:
        try:
            config = LNTuningConfig.from_pretrained(folder)
            record = RunRecord.read(folder, config)
        except (OSError, ValueError, TypeError):
            return None  # unreadable: listed, and its requests fail with a 500 naming the file
        saved_for = task_of_type(config.task_type)
        if config.task_type is not None and saved_for is not self.task:
            served = saved_for.name if saved_for else str(config.task_type)
            return bad_request(
                f"Adapter '{name}' was saved for task_type {config.task_type} ({folder / CONFIG_NAME}), but this "
                f"server serves {self.task.name}; serve it with lntune serve --task {served}.",
                param="model",
                code="adapter_task_mismatch",
            )
        if self.base_model_path is not None and not same_base_model(
            record.base_model, self.base_model_path, self.base_model_id
        ):
            source = RUN_FILE if (folder / RUN_FILE).is_file() else CONFIG_NAME
            return bad_request(
                f"Adapter '{name}' was trained for the base model {record.base_model} ({folder / source}), but this "
                f"server serves {self.base_model_id} ({self.base_model_path}); serve it with lntune serve --model "
                f"{record.base_model}.",
                param="model",
                code="adapter_base_model_mismatch",
            )
        return None
