"""Adapter state dicts in PEFT's naming: reading them from the modules, checking and writing them back.

Checkpoint keys (relative to the object passed in, so ``base_model.model.`` for a `PeftModel`):

* an LN tuning copy:     ``<module path>.ln_tuning_layers.<param>``  (no adapter name)
* a module_to_save copy: ``<module path>.<param>``

Loading also accepts PEFT's nested-target form ``<module path>.ln_tuning_layers.<adapter>.<param>``.
Loading is all-or-nothing: every key, shape and dtype is checked before any tensor is written.
Only the wrappers that hold the adapter are visited, so the cost does not depend on how many other
adapters are resident.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch
from torch import nn

from lntune.checkpoint.files import CheckpointError, adapter_weights_path, read_adapter_weights
from lntune.layer import LNTuningLayer
from lntune.model import LNTuningModel
from lntune.wrapper import AdapterWrapper, named_wrappers

LN_KEY = "ln_tuning_layers"
# Modules that FSDP1 (auto-wrap) and torch's checkpoint_wrapper insert into module paths; not part of keys.
_WRAPPER_PREFIX = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


# ------------------------------------------------------------------------------ state dicts
def _named_wrappers(model: nn.Module) -> list[tuple[str, AdapterWrapper]]:
    """``(path relative to model, wrapper)``: a `PeftModel`'s or `LNTuningModel`'s kept list, else a walk."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, LNTuningModel):  # a PeftModel
        return [(f"base_model.model.{name}", wrapper) for name, wrapper in tuner.tuner_modules()]
    if isinstance(model, LNTuningModel):
        return [(f"model.{name}", wrapper) for name, wrapper in model.tuner_modules()]
    return [(_WRAPPER_PREFIX.sub("", name), wrapper) for name, wrapper in named_wrappers(model)]


def _wrappers(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterWrapper]]:
    """``(checkpoint key prefix, wrapper)`` for every wrapper in ``model`` that holds ``adapter_name``."""
    return [
        (f"{name}." if name else "", wrapper)
        for name, wrapper in _named_wrappers(model)
        if wrapper.has_adapter(adapter_name)
    ]


def _adapter_modules(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(checkpoint key prefix, tuned module)`` for every copy of ``adapter_name`` in ``model``."""
    return [
        (f"{prefix}{LN_KEY}." if isinstance(wrapper, LNTuningLayer) else prefix, wrapper.tuned_module(adapter_name))
        for prefix, wrapper in _wrappers(model, adapter_name)
    ]


def _original_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``<path>.base_layer.<param>`` -> the pristine tensor of every LN target of ``adapter_name``.

    PEFT also saves these frozen originals when a target is an embedding layer (save_embedding_layers).
    """
    return {
        f"{prefix}base_layer.{key}": tensor
        for prefix, wrapper in _wrappers(_unwrap(model), adapter_name)
        if isinstance(wrapper, LNTuningLayer)
        for key, tensor in wrapper.original_module.state_dict().items()
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile'd modules


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's checkpoint keys (tuned values, merged or not).

    Args:
        model: A `PeftModel`, or a model given adapters by `inject_adapter_in_model`.
        state_dict: Ignored (PEFT's signature); the copies are read from the modules themselves.
        adapter_name: Which adapter.
        unwrap_compiled: Accepted for PEFT compatibility; compiled models are always unwrapped.
        save_embedding_layers: Accepted for PEFT compatibility; LN tuning copies are saved as they are.

    Returns:
        ``{key: tensor}``; the tensors are the live parameters (detach or clone before changing them).

    Example:
        >>> sd = get_peft_model_state_dict(peft_model)
        >>> next(iter(sd))
        'base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight'
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in _adapter_modules(_unwrap(model), adapter_name):
        for key, tensor in module.state_dict(keep_vars=True).items():
            out[prefix + key] = tensor
    return out


_NESTED_ADAPTER = re.compile(rf"(^|\.){LN_KEY}\.[^.]+\.")


def _resolve_key(key: str, expected: dict[str, torch.Tensor]) -> str | None:
    """Map a checkpoint key onto ``expected``'s keys, accepting PEFT's nested ``.<adapter>.`` form."""
    if key in expected:
        return key
    candidate = _NESTED_ADAPTER.sub(rf"\1{LN_KEY}.", key, count=1)
    return candidate if candidate in expected else None


def _check_tensor(key: str, value: torch.Tensor, have: torch.Tensor) -> None:
    """Raise `CheckpointError` unless ``value`` can be copied into ``have`` (floating values of any precision)."""
    if tuple(value.shape) != tuple(have.shape):
        raise CheckpointError(
            f"Shape mismatch for '{key}': checkpoint has {tuple(value.shape)}, the model expects "
            f"{tuple(have.shape)}. Was the adapter trained on a model of another size?"
        )
    if have.is_floating_point() != value.is_floating_point() or value.is_complex():
        raise CheckpointError(
            f"dtype mismatch for '{key}': checkpoint has {value.dtype}, the model {have.dtype} (floating "
            "tensors of any precision are cast; integer, bool or complex ones are refused)."
        )
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointError(f"'{key}' holds NaN or infinite values; the adapter is broken (diverged training?).")


def _check_original(key: str, value: torch.Tensor, have: torch.Tensor) -> None:
    """A saved frozen original (PEFT's embedding targets) must equal the model's: lntune never changes it."""
    same = tuple(value.shape) == tuple(have.shape) and torch.equal(value.to(have.dtype), have.detach().cpu())
    if not same:
        raise CheckpointError(
            f"'{key}' holds base-model weights (PEFT saves them for embedding targets) that differ from this "
            "model's; lntune loads adapter weights only and never changes the base model. Load the adapter onto "
            "the base model it was trained on (same vocabulary size)."
        )


def check_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> tuple[dict[str, str], IncompatibleKeys]:
    """Match a checkpoint against the model's copies of ``adapter_name`` without changing anything.

    Returns ``({checkpoint key: model key}, IncompatibleKeys)``. Raises `CheckpointError`, naming the
    key, for a shape mismatch, an integer/bool/complex or non-finite tensor, two tensors for one key, or
    saved base weights (``<path>.base_layer.<param>``, PEFT's embedding targets) that differ from the
    model's; equal ones are accepted and skipped.
    """
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    originals: dict[str, torch.Tensor] | None = None
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in peft_model_state_dict.items():
        target = _resolve_key(key, expected)
        if target is None:
            originals = _original_tensors(model, adapter_name) if originals is None else originals
            if key in originals:
                _check_original(key, value, originals[key])
            else:
                unexpected.append(key)
            continue
        if target in mapping.values():
            raise CheckpointError(f"Checkpoint has two tensors for '{target}' (one is '{key}').")
        _check_tensor(key, value, expected[target])
        mapping[key] = target
    missing = sorted(set(expected) - set(mapping.values()))
    return mapping, IncompatibleKeys(missing, sorted(unexpected))


def _describe_keys(result: IncompatibleKeys, shown: int = 5) -> str:
    parts = []
    for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} key(s) {keys[:shown]}{more}")
    return "; ".join(parts)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    strict: bool = False,
) -> IncompatibleKeys:
    """Copy a checkpoint into the copies of ``adapter_name``, in place (all-or-nothing).

    Args:
        model: A `PeftModel` (or an injected model) that already has ``adapter_name``.
        peft_model_state_dict: Tensors under PEFT's checkpoint keys.
        adapter_name: The adapter to fill.
        ignore_mismatched_sizes: Skip tensors whose shape differs instead of raising.
        low_cpu_mem_usage: Accepted for PEFT compatibility.
        strict: Raise `CheckpointError` on missing or unexpected keys (nothing is changed).

    Returns:
        ``IncompatibleKeys(missing_keys, unexpected_keys)`` with model-side missing keys, as PEFT.

    Example:
        >>> set_peft_model_state_dict(peft_model, read_adapter_weights("out/adapter_model.safetensors"))
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
    """
    state = peft_model_state_dict
    if ignore_mismatched_sizes:
        expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
        state = {
            k: v
            for k, v in state.items()
            if (t := _resolve_key(k, expected)) is None or tuple(expected[t].shape) == tuple(v.shape)
        }
    mapping, result = check_peft_model_state_dict(model, state, adapter_name)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"Checkpoint does not fit adapter '{adapter_name}' of this model: {_describe_keys(result)}. Is it an "
            "adapter for another architecture, size or target list?"
        )
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    with torch.no_grad():
        for key, target in mapping.items():
            expected[target].copy_(state[key])
    return result


# ------------------------------------------------------------------------------- from files
def load_into_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> IncompatibleKeys:
    """Read ``folder``'s weights file and copy it strictly into ``adapter_name`` (all-or-nothing).

    Args:
        model: A `PeftModel` (or an injected model) that already has ``adapter_name``.
        folder: An adapter folder (``adapter_model.safetensors`` or ``.bin``).
        adapter_name: The adapter to fill.

    Returns:
        ``IncompatibleKeys`` (empty: any mismatch raises).

    Raises:
        CheckpointError: the weights do not fit; the message starts with the weights file's path.

    Example:
        >>> load_into_adapter(peft_model, "out/", "default")
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
    """
    path = adapter_weights_path(folder)
    return fill_adapter(model, read_adapter_weights(path), path, adapter_name)


def fill_adapter(model: nn.Module, weights: dict, weights_path: str, adapter_name: str) -> IncompatibleKeys:
    """Strictly copy ``weights`` (read from ``weights_path``) into ``adapter_name``; errors name the file."""
    try:
        return set_peft_model_state_dict(model, weights, adapter_name=adapter_name, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{weights_path}: {exc}") from None
