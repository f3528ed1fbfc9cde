"""`RunRecord`: how an adapter was trained (``lntune_run.json``), written and read in this one place.

``lntune train`` writes the record next to the adapter; ``lntune eval`` and ``lntune merge`` read it to
rebuild the model and the data exactly as in training, and ``lntune serve`` to serve the adapter as it
was trained (its base model, task, labels and token limit). An adapter folder without a record (saved
by PEFT or by `PeftModel.save_pretrained`) still has one: what its ``adapter_config.json`` tells.

>>> record = RunRecord.read(Path("lntune-output"))
>>> record.task, record.max_length
('seq-cls', 128)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lntune.atomic import atomic_write_bytes
from lntune.config import CONFIG_NAME, LNTuningConfig
from lntune.errors import InputError
from lntune.tasks import task_of_type

#: The record's file name, in the adapter folder.
RUN_FILE = "lntune_run.json"


class RunRecordError(InputError):
    """An adapter folder's ``lntune_run.json`` or ``adapter_config.json`` cannot be read (the message names it)."""


@dataclass
class RunRecord:
    """How an adapter was trained.

    Args:
        base_model: The base model's folder (or Hub id), None if unknown.
        task: The task's command-line name (`lntune.tasks`), None if unknown.
        labels: The class names in id order (classification), None if unknown.
        text_column: The data column with the text.
        label_column: The data column with the label.
        max_length: Tokens per text in training: longer texts were truncated there, and are at evaluation
            and serving. None if unknown (the model's own limit then applies).
        files: The files the run wrote (what ``--overwrite`` may replace); written by the command line.
        extra: Any other keys of the file, kept as they are.
    """

    base_model: str | None = None
    task: str | None = None
    labels: list[str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int | None = None
    files: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object of the file (``extra`` merged in, None values left out)."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        return {**self.extra, **data}

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/lntune_run.json`` atomically and return its path."""
        path = Path(folder) / RUN_FILE
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """A record from the file's JSON object (unknown keys go to ``extra``)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known}
        )

    @classmethod
    def read(cls, folder: str | Path, config: LNTuningConfig | None = None) -> RunRecord:
        """The record of the adapter in ``folder``: its ``lntune_run.json``, completed from its adapter config.

        Args:
            folder: An adapter folder.
            config: Its config, if already read (else ``adapter_config.json`` is read when the record lacks
                the base model or the task).

        Returns:
            The record; fields neither file knows stay None.

        Raises:
            RunRecordError: a file exists but is not valid (the message names it).

        Example:
            >>> RunRecord.read(Path("peft-adapter")).task  # no lntune_run.json: the config's task_type
            'causal-lm'
        """
        folder = Path(folder)
        path = folder / RUN_FILE
        data: dict = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise RunRecordError(f"{path} is not valid JSON ({exc}); restore it, or delete it.") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise RunRecordError(f"{path}: cannot read it ({exc}); restore it, or delete it.") from None
            if not isinstance(data, dict):
                raise RunRecordError(f"{path} is not valid JSON: not an object; restore it, or delete it.")
        record = cls.from_dict(data)
        if record.base_model is None or record.task is None:
            if config is None and (folder / CONFIG_NAME).is_file():
                try:
                    config = LNTuningConfig.from_pretrained(folder)
                except (OSError, ValueError, TypeError) as exc:
                    raise RunRecordError(str(exc)) from None
            if config is not None:
                task = task_of_type(config.task_type)
                record.task = record.task or (task.name if task else None)
                record.base_model = record.base_model or config.base_model_name_or_path or None
        return record
