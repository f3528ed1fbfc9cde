"""`LNTuningConfig`: the adapter's settings and their JSON form (``adapter_config.json``).

The JSON keys are PEFT's, so a config written here loads in PEFT and a PEFT config loads here.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LN_TUNING"


class TaskType(str, enum.Enum):
    """The task a model is tuned for; selects the `PeftModel` variant (same values as PEFT)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """The adapter methods lntune knows; only LN tuning."""

    LN_TUNING = PEFT_TYPE

    def __str__(self) -> str:
        return self.value


def _check_module_names(name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        # Sets (as PEFT stores resolved defaults) become sorted lists so that files are deterministic.
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"LNTuningConfig.{name} must be None, a regex string or a list of module names, got {value!r}.")


@dataclass
class LNTuningConfig:
    """Configuration of an LN tuning adapter.

    Args:
        target_modules: Modules to tune. A list matches a module whose full name equals an entry or ends
            with ``"." + entry``; a string is a regular expression that must match the full name. ``None``
            uses the default for the model's ``model_type`` or, for unknown architectures, every
            normalization layer found by type.
        exclude_modules: Modules never to tune, matched like ``target_modules``.
        modules_to_save: Extra modules trained in full and saved with the adapter (for example a
            classifier head). Matched by exact name or ``.``-suffix.
        task_type: A `TaskType` (or its string value); selects the `PeftModel` variant.
        inference_mode: Freeze the adapter (set by `PeftModel.from_pretrained` unless ``is_trainable``).
        base_model_name_or_path: Where the base model came from; filled in by `get_peft_model`.
        revision: Revision of the base model, kept for PEFT compatibility.
        auto_mapping: PEFT's record of the base model class for custom models.
        peft_version: Version of the library that wrote the file (kept when loading PEFT's files).

    Example:
        >>> from lntune import LNTuningConfig, TaskType
        >>> config = LNTuningConfig(task_type=TaskType.CAUSAL_LM, exclude_modules=["norm"])
        >>> config.to_dict()["peft_type"]
        'LN_TUNING'
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str = PeftType.LN_TUNING
    auto_mapping: dict | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_version: str | None = None
    target_modules: list[str] | str | None = field(default=None)
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: {valid}."
                ) from None
        if str(self.peft_type) != PEFT_TYPE:
            raise ValueError(
                f"LNTuningConfig got peft_type={self.peft_type!r}; lntune only handles '{PEFT_TYPE}' adapters."
            )
        self.peft_type = PeftType.LN_TUNING
        self.target_modules = _check_module_names("target_modules", self.target_modules)
        self.exclude_modules = _check_module_names("exclude_modules", self.exclude_modules)
        modules_to_save = _check_module_names("modules_to_save", self.modules_to_save)
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        self.modules_to_save = modules_to_save

    # PEFT's config exposes these flags; tuners and Trainer integrations read them.
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict with PEFT's keys (enums become strings)."""
        out = asdict(self)
        out["peft_type"] = str(self.peft_type)
        out["task_type"] = None if self.task_type is None else str(self.task_type)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed), atomically.

        The file always says ``"inference_mode": true``, as PEFT's do; the object is not changed.
        """
        from lntune.checkpoint import atomic_write_bytes

        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data["inference_mode"] = True
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LNTuningConfig:
        """Build a config from a dict such as ``json.load(adapter_config.json)``.

        Unknown keys (from newer PEFT versions or other methods' defaults) are ignored with a warning.
        Raises ``ValueError`` naming ``source`` and the field at fault.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        if "peft_type" not in data:
            raise ValueError(f'{source}: missing \'peft_type\'; expected "peft_type": "{PEFT_TYPE}".')
        if data["peft_type"] != PEFT_TYPE:
            raise ValueError(
                f"{source}: peft_type is {data['peft_type']!r}, but lntune only loads '{PEFT_TYPE}' adapters."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}.", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if not isinstance(kwargs.get("inference_mode", False), bool):
            raise ValueError(f"{source}: 'inference_mode' must be true or false.")
        for name, kind in (("base_model_name_or_path", str), ("revision", str), ("peft_version", str)):
            if not isinstance(kwargs.get(name), (kind, type(None))):
                raise ValueError(f"{source}: '{name}' must be a string or null, got {kwargs[name]!r}.")
        if not isinstance(kwargs.get("auto_mapping"), (dict, type(None))):
            raise ValueError(f"{source}: 'auto_mapping' must be an object or null, got {kwargs['auto_mapping']!r}.")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LNTuningConfig:
        """Read a config from a JSON file; errors name the file and the problem."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"No adapter config at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None
    ) -> LNTuningConfig:
        """Read ``adapter_config.json`` from a local folder (optionally a subfolder of it)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"Adapter folder {folder} does not exist; lntune loads adapters from local folders only."
            )
        return cls.from_json_file(os.path.join(folder, CONFIG_NAME))

    def copy(self) -> LNTuningConfig:
        return copy.deepcopy(self)
