"""Adapter state dicts in PEFT's naming, safetensors/bin I/O, validation and atomic writes.

Checkpoint keys (relative to the object passed in, so ``base_model.model.`` for a `PeftModel`):

* an LN tuning copy:     ``<module path>.ln_tuning_layers.<param>``  (no adapter name)
* a module_to_save copy: ``<module path>.<param>``

Loading also accepts PEFT's nested-target form ``<module path>.ln_tuning_layers.<adapter>.<param>``.
Loading is all-or-nothing: every key, shape and dtype is checked before any tensor is written, and
`restore_on_error` undoes the adding of an adapter whose loading fails. Writing goes through
`atomic_write_bytes`, so a failed save never damages the previous files.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
# Modules that FSDP1 (auto-wrap) and torch's checkpoint_wrapper insert into module paths; not part of keys.
_WRAPPER_PREFIX = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; raised before anything is changed."""


# ------------------------------------------------------------------------------------ writing
def _new_file_mode(path: str) -> int:
    """The permissions ``open(path, "w")`` would give: the old file's, else ``0o666`` minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    An interrupted or failed write leaves any previous file at ``path`` byte-identical and no temporary
    file behind. The new file gets the permissions a plain ``open(path, "w")`` would give.

    Args:
        path: The file to (over)write; its folder must exist.
        data: The complete new contents.

    Example:
        >>> atomic_write_bytes("out/adapter_config.json", b"{}")
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def serialize_adapter_weights(
    state_dict: dict[str, torch.Tensor], safe_serialization: bool = True
) -> tuple[str, bytes]:
    """``(file name, bytes)`` of ``state_dict`` as ``adapter_model.safetensors`` or ``adapter_model.bin``.

    Serializing before writing anything means a failure here (odd tensors, out of memory) touches no file.

    Args:
        state_dict: Tensors under checkpoint keys (copied to contiguous CPU tensors first).
        safe_serialization: safetensors (with PEFT's ``{"format": "pt"}`` metadata) or a torch pickle.

    Returns:
        The file name inside the adapter folder and its contents.

    Example:
        >>> name, data = serialize_adapter_weights(get_peft_model_state_dict(model))
        >>> name
        'adapter_model.safetensors'
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if safe_serialization:
        return SAFETENSORS_WEIGHTS_NAME, safetensors_save(tensors, metadata={"format": "pt"})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return WEIGHTS_NAME, buffer.getvalue()


def write_adapter_weights(folder: str | os.PathLike, file_name: str, data: bytes) -> str:
    """Atomically write serialized weights into ``folder`` and drop the other format's stale file.

    Loading prefers ``adapter_model.safetensors``, so an old one left next to a new ``.bin`` would
    shadow it; it is removed only after the new file is complete.

    Args:
        folder: The adapter folder (must exist).
        file_name: `SAFETENSORS_WEIGHTS_NAME` or `WEIGHTS_NAME`, from `serialize_adapter_weights`.
        data: The file's contents.

    Returns:
        The path written.

    Example:
        >>> write_adapter_weights("out", *serialize_adapter_weights(state_dict))
        'out/adapter_model.safetensors'
    """
    path = os.path.join(os.fspath(folder), file_name)
    atomic_write_bytes(path, data)
    other = WEIGHTS_NAME if file_name == SAFETENSORS_WEIGHTS_NAME else SAFETENSORS_WEIGHTS_NAME
    stale = os.path.join(os.fspath(folder), other)
    if os.path.isfile(stale):
        os.remove(stale)
    return path


def save_adapter_weights(
    state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, safe_serialization: bool = True
) -> str:
    """Serialize ``state_dict`` and write it atomically into ``folder``; returns the path written.

    Example:
        >>> save_adapter_weights(get_peft_model_state_dict(model), "out")
        'out/adapter_model.safetensors'
    """
    return write_adapter_weights(folder, *serialize_adapter_weights(state_dict, safe_serialization))


# ------------------------------------------------------------------------------------ reading
def adapter_weights_path(folder: str | os.PathLike) -> str:
    """The weights file of an adapter folder: ``adapter_model.safetensors``, else ``adapter_model.bin``.

    Raises ``FileNotFoundError`` naming the folder and both file names.
    """
    folder = os.fspath(folder)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Adapter folder {folder} does not exist.")
    raise FileNotFoundError(f"No adapter weights in {folder}: expected {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}.")


def _unpickling_reason(exc: BaseException) -> str:
    """The useful line of torch's weights_only error (without its advice to disable the check)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a ``.bin`` with ``torch.load(weights_only=True)`` only.

    A ``.bin`` holding anything but plain tensors (for example a pickled object with code) is refused
    without running it.

    Args:
        path: ``.../adapter_model.safetensors`` or ``.../adapter_model.bin``.

    Returns:
        ``{checkpoint key: tensor}`` on the CPU.

    Raises:
        CheckpointError: naming ``path``, if it is not a readable file of that format or does not map
            string keys to tensors.

    Example:
        >>> read_adapter_weights("out/adapter_model.safetensors").keys()
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            with open(path, "rb") as fh:
                tensors = safetensors_load(fh.read())
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from None
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
            raise CheckpointError(
                f"{path} could not be loaded as plain tensors with torch.load(weights_only=True) "
                f"({_unpickling_reason(exc)}). lntune never unpickles other objects; re-save the adapter "
                "with safe_serialization=True where it was trusted."
            ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path} must map string keys to tensors, got {type(tensors).__name__}.")
    return tensors


def load_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the adapter weights of ``folder`` (`adapter_weights_path` then `read_adapter_weights`).

    Example:
        >>> set_peft_model_state_dict(peft_model, load_adapter_weights("out/"))
    """
    return read_adapter_weights(adapter_weights_path(folder))


# ------------------------------------------------------------------------------ state dicts
def _wrappers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, LNTuningLayer | ModulesToSaveWrapper]]:
    """``(checkpoint key prefix, wrapper)`` for every wrapper in ``model`` that holds ``adapter_name``."""
    for name, module in model.named_modules():
        if isinstance(module, (LNTuningLayer, ModulesToSaveWrapper)) and adapter_name in module.adapter_copies:
            name = _WRAPPER_PREFIX.sub("", name)
            yield (f"{name}." if name else ""), module


def _adapter_modules(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """``(checkpoint key prefix, tuned module)`` for every copy of ``adapter_name`` in ``model``."""
    for prefix, wrapper in _wrappers(model, adapter_name):
        key_prefix = f"{prefix}{LN_KEY}." if isinstance(wrapper, LNTuningLayer) else prefix
        yield key_prefix, wrapper.module_for(adapter_name)


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
        raise CheckpointError(
            f"Checkpoint does not fit adapter '{adapter_name}' of this model: {_describe_keys(result)}. Is it an "
            "adapter for another architecture, size or target list?"
        )
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    with torch.no_grad():
        for key, target in mapping.items():
            expected[target].copy_(state[key])
    return result


# ----------------------------------------------------------------------------- all-or-nothing
_WRAPPERS = (LNTuningLayer, ModulesToSaveWrapper)


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


@contextmanager
def restore_on_error(root: nn.Module, adapter_name: str) -> Iterator[None]:
    """Undo whatever adding ``adapter_name`` to ``root`` did, if the body raises (any exception).

    Wrappers created in the body are replaced by the modules they wrap, wrappers that existed before
    lose their ``adapter_name`` copy (if any), and every parameter gets back its ``requires_grad``
    flag. Existing copies are never written by loading, so this restores ``root`` exactly. The
    adapter's bookkeeping (``peft_config``) is the caller's to restore.

    Args:
        root: The model the adapter is added to (the base model, not the `PeftModel`).
        adapter_name: The adapter being added; ``ValueError`` (before anything runs) if ``root`` holds it.

    Example:
        >>> with restore_on_error(model, "new"):
        ...     LNTuningModel(model, config, "new")  # raises: model is as it was
    """
    holder = next(_wrappers(root, adapter_name), None)
    if holder is not None:
        raise ValueError(
            f"The model already holds adapter '{adapter_name}' (at '{holder[0].rstrip('.')}'); adding it again "
            "would overwrite it. Load under another name, or start from a fresh base model (or unload() first)."
        )
    existing = {id(m) for m in root.modules() if isinstance(m, _WRAPPERS)}
    grads = [(p, p.requires_grad) for p in root.parameters()]
    try:
        yield
    except BaseException:
        for name, module in list(root.named_modules()):
            if not isinstance(module, _WRAPPERS):
                continue
            if id(module) in existing:
                module.delete_adapter(adapter_name)
            else:
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, module.original_module)
        for param, flag in grads:
            param.requires_grad_(flag)
        raise
