"""The base model's own weights, under its own key names, read from and written into a wrapped model.

`get_base_model_state_dict` is the state dict the model had before `get_peft_model` (no adapter copies,
no ``base_layer`` / ``original_module`` in the keys); `set_base_model_state_dict` loads such a dict back
into the wrapped model, for example after FSDP wrapping. Same names and results as PEFT's functions.
"""

from __future__ import annotations

import torch
from torch import nn

from lntune.checkpoint import IncompatibleKeys
from lntune.model import tuner_of
from lntune.wrapper import AdapterWrapper, named_wrappers


def _wrappers(root: nn.Module) -> dict[str, AdapterWrapper]:
    return dict(named_wrappers(root))


def _owner(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The wrapper name whose state holds ``key`` (prefixes end with '.'), else None."""
    return next((p[:-1] for p in prefixes if key.startswith(p)), None)


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original keys: what ``model`` held before the adapters.

    Each wrapper contributes its original (pristine) module's state, wherever a merge put it; adapter
    copies are left out.

    Args:
        model: A `PeftModel`, or a model given to ``inject_adapter_in_model``.

    Returns:
        ``{original key: tensor}`` (the model's own tensors, not copies).

    Example:
        >>> set(get_base_model_state_dict(peft_model)) == set(fresh_base_model.state_dict())
        True
    """
    tuner = tuner_of(model)
    root = model if tuner is None else tuner.model
    wrappers = _wrappers(root)
    prefixes = tuple(f"{name}." for name in wrappers)
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for key, tensor in root.state_dict().items():
        owner = _owner(key, prefixes)
        if owner is None:
            state[key] = tensor
        elif owner not in seen:  # at the wrapper's first key: its original module's state, in its place
            seen.add(owner)
            state.update(wrappers[owner].original_module.state_dict(prefix=f"{owner}."))
    return state


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load base-model weights (original keys, as from `get_base_model_state_dict`) into a wrapped model.

    Wrapped modules receive them in their original module; adapter copies are not touched. Every key and
    shape is checked before anything is written, so a bad dict changes nothing.

    Args:
        model: A `PeftModel`, or a model given to ``inject_adapter_in_model``.
        state_dict: ``{original key: tensor}``.
        strict: Raise ``RuntimeError`` (changing nothing) on missing or unexpected keys.

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)``.

    Raises:
        RuntimeError: a shape differs, or (``strict``) keys are missing or unexpected.

    Example:
        >>> set_base_model_state_dict(peft_model, torch.load("base.pt"))
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
    """
    current = get_base_model_state_dict(model)
    missing = [k for k in current if k not in state_dict]
    unexpected = [k for k in state_dict if k not in current]
    errors = [f"Missing key(s) in state_dict: {missing}"] if strict and missing else []
    errors += [f"Unexpected key(s) in state_dict: {unexpected}"] if strict and unexpected else []
    errors += [
        f"size mismatch for {k}: copying a param with shape {tuple(v.shape)}, the model's is {tuple(current[k].shape)}"
        for k, v in state_dict.items()
        if k in current and v.shape != current[k].shape
    ]
    if errors:
        details = "\n\t".join(errors)
        raise RuntimeError(f"Error(s) in loading the base model's state_dict (nothing was loaded):\n\t{details}")
    tuner = tuner_of(model)
    root = model if tuner is None else tuner.model
    wrappers = _wrappers(root)
    prefixes = tuple(f"{name}." for name in wrappers)
    parts: dict[str | None, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in current:
            owner = _owner(key, prefixes)
            parts.setdefault(owner, {})[key[len(owner) + 1 :] if owner else key] = tensor
    for owner, part in parts.items():
        target = root if owner is None else wrappers[owner].original_module
        target.load_state_dict(part, strict=False)
    return IncompatibleKeys(missing, unexpected)
