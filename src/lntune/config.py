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

from lntune.atomic import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LN_TUNING"
# The PEFT release whose adapter_config.json / weights format lntune writes (and whose own test suite
# scripts/peft_conformance.sh runs against lntune). New configs record it as ``peft_version``, so that PEFT's
# version-dependent loading code treats lntune's files as files of that release.
PEFT_FORMAT_VERSION = "0.21.2"


class MissingConfigKeyError(ValueError, TypeError):
    """An adapter config lacks a required key: a ``ValueError`` as lntune's other config errors, and the
    ``TypeError`` PEFT raises for the same file."""


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


def _enum_value(value: Any) -> Any:
    """``TaskType.CAUSAL_LM`` of any library (PEFT's included) -> ``"CAUSAL_LM"``; other values unchanged."""
    return value.value if isinstance(value, enum.Enum) else value


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
        peft_version: The PEFT release whose file format the adapter follows. ``None`` fills in
            `PEFT_FORMAT_VERSION` (the release lntune writes and is tested against, as PEFT fills in its own
            version); a loaded file keeps its value.

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
                self.task_type = TaskType(_enum_value(self.task_type))
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(
                    f"Invalid task type: '{self.task_type}'. Must be one of the following task types: {valid}."
                ) from None
        if _enum_value(self.peft_type) != PEFT_TYPE:
            # As PEFT's LNTuningConfig does, the type is always LN_TUNING; say so instead of staying silent.
            warnings.warn(
                f"LNTuningConfig ignores peft_type={_enum_value(self.peft_type)!r}: an LNTuningConfig is always "
                f"'{PEFT_TYPE}'. Use the config class of the method you want for other adapter types.",
                stacklevel=3,
            )
        self.peft_type = PeftType.LN_TUNING
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
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

        The file holds `to_dict` as it is, as PEFT's config does (`PeftModel.save_pretrained` writes
        ``"inference_mode": true`` for the adapters it saves).
        """
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode("utf-8"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LNTuningConfig:
        """Build a config from a dict such as ``json.load(adapter_config.json)``.

        Unknown keys (from newer PEFT versions or other methods' defaults) are ignored with a warning
        worded as PEFT's. Raises ``ValueError`` naming ``source`` and the field at fault (for a missing
        ``peft_type``, a `MissingConfigKeyError`, which is also the ``TypeError`` PEFT raises).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        if "peft_type" not in data:
            raise MissingConfigKeyError(
                f"{source}: The {cls.__name__} config that is trying to be loaded is missing required keys: "
                f"{{'peft_type'}}. It is not an adapter config; an LN tuning adapter's says "
                f'"peft_type": "{PEFT_TYPE}".'
            )
        if _enum_value(data["peft_type"]) != PEFT_TYPE:
            raise ValueError(
                f"{source}: peft_type is {data['peft_type']!r}, but lntune only loads '{PEFT_TYPE}' adapters."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. ({source} "
                "was probably written by a newer PEFT version, or holds another adapter method's fields; lntune "
                "reads the LN tuning fields only.)",
                stacklevel=2,
            )
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
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        """Read an ``adapter_config.json`` as a dict (as PEFT's ``from_json_file`` does); `from_dict` builds the config.

        A ``runtime_config`` entry (PEFT's runtime-only settings, never meant for files) is dropped with a warning.

        Args:
            path_json_file: The JSON file.

        Returns:
            The file's JSON object.

        Raises:
            FileNotFoundError / ValueError: naming the file when it is missing or not valid JSON.

        Example:
            >>> LNTuningConfig.from_json_file("out/adapter_config.json")["peft_type"]
            'LN_TUNING'
        """
        path = os.fspath(path_json_file)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"No adapter config at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "runtime_config" in data:
            warnings.warn(
                f"The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations "
                f"are only valid at runtime. ({path})",
                stacklevel=2,
            )
            del data["runtime_config"]
        return data

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
        path = os.path.join(folder, CONFIG_NAME)
        return cls.from_dict(cls.from_json_file(path), source=path)

    def copy(self) -> LNTuningConfig:
        return copy.deepcopy(self)
