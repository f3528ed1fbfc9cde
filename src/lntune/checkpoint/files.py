"""Adapter files: safetensors/bin serialization, reading with checks, and atomic writes.

Writing goes through `lntune.atomic.atomic_write_bytes` (a temporary file in the same folder, then a
rename), so a failed or interrupted save never damages the previous files. Reading accepts safetensors, or a
``.bin`` loaded with ``torch.load(weights_only=True)`` only, and names the file in every error.
"""

from __future__ import annotations

import io
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from lntune.atomic import atomic_write_bytes

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (or cannot be read); raised before anything is changed."""


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
