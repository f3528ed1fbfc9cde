"""Adapter state dicts in PEFT's naming, safetensors/bin I/O, validation and atomic writes.

Checkpoint keys (relative to the object passed in, so ``base_model.model.`` for a `PeftModel`):

* an LN tuning copy:     ``<module path>.ln_tuning_layers.<param>``  (no adapter name)
* a module_to_save copy: ``<module path>.<param>``

Loading also accepts PEFT's nested-target form ``<module path>.ln_tuning_layers.<adapter>.<param>``.
Loading is all-or-nothing: every key, shape and dtype is checked before any tensor is written.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from lntune.layer import LNTuningLayer
from lntune.modules_to_save import ModulesToSaveWrapper

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
LN_KEY = "ln_tuning_layers"


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; raised before anything is changed."""


# ------------------------------------------------------------------------------------ writing
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    An interrupted write leaves any previous file at ``path`` intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter_weights(
    state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, safe_serialization: bool = True
) -> str:
    """Write ``state_dict`` as ``adapter_model.safetensors`` (or ``.bin``) in ``folder``; returns the path."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if safe_serialization:
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        atomic_write_bytes(path, safetensors_save(tensors, metadata={"format": "pt"}))
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        path = os.path.join(folder, WEIGHTS_NAME)
        atomic_write_bytes(path, buffer.getvalue())
    return path


# ------------------------------------------------------------------------------------ reading
def load_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the adapter weights of ``folder`` (safetensors preferred; ``.bin`` only as plain tensors).

    Raises ``FileNotFoundError`` or `CheckpointError` naming the file.
    """
    folder = os.fspath(folder)
    st_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            with open(st_path, "rb") as fh:
                tensors = safetensors_load(fh.read())
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(f"{st_path} is not a readable safetensors file: {exc}") from None
        path = st_path
    elif os.path.isfile(bin_path):
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            raise CheckpointError(
                f"{bin_path} could not be loaded as plain tensors (weights_only=True): {exc}"
            ) from None
        path = bin_path
    else:
        raise FileNotFoundError(
            f"No adapter weights in {folder}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}."
        )
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path} must map string keys to tensors.")
    return tensors


# ------------------------------------------------------------------------------ state dicts
def _adapter_modules(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """``(checkpoint key prefix, tuned module)`` for every copy of ``adapter_name`` in ``model``."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LNTuningLayer) and adapter_name in module.ln_tuning_layers:
            yield f"{prefix}{LN_KEY}.", module.adapter_module(adapter_name)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            yield prefix, module.modules_to_save[adapter_name]


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


def check_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> tuple[dict[str, str], IncompatibleKeys]:
    """Match a checkpoint against the model's copies of ``adapter_name`` without changing anything.

    Returns ``({checkpoint key: model key}, IncompatibleKeys)``. Raises `CheckpointError` for a shape
    mismatch or a non-floating tensor where a floating one is expected, naming the key.
    """
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key, value in peft_model_state_dict.items():
        target = _resolve_key(key, expected)
        if target is None:
            unexpected.append(key)
            continue
        if target in mapping.values():
            raise CheckpointError(f"Checkpoint has two tensors for '{target}' (one is '{key}').")
        have = expected[target]
        if tuple(value.shape) != tuple(have.shape):
            raise CheckpointError(
                f"Shape mismatch for '{key}': checkpoint has {tuple(value.shape)}, the model expects "
                f"{tuple(have.shape)}. Was the adapter trained on a model of another size?"
            )
        if have.is_floating_point() != value.is_floating_point() or value.is_complex():
            raise CheckpointError(f"dtype mismatch for '{key}': checkpoint has {value.dtype}, the model {have.dtype}.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"'{key}' holds NaN or infinite values.")
        mapping[key] = target
    missing = sorted(set(expected) - set(mapping.values()))
    return mapping, IncompatibleKeys(missing, sorted(unexpected))


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
        >>> set_peft_model_state_dict(peft_model, load_adapter_weights("out/"))
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
        problems = []
        if result.missing_keys:
            problems.append(f"missing keys {result.missing_keys[:5]}")
        if result.unexpected_keys:
            problems.append(f"unexpected keys {result.unexpected_keys[:5]}")
        raise CheckpointError(
            f"Checkpoint does not fit adapter '{adapter_name}' of this model: {'; '.join(problems)}. Is it an "
            "adapter for another architecture or target list?"
        )
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    with torch.no_grad():
        for key, target in mapping.items():
            expected[target].copy_(state[key])
    return result
