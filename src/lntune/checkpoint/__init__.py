"""Checkpoints in PEFT's format: files (`lntune.checkpoint.files`) and state dicts (`lntune.checkpoint.state_dict`)."""

from lntune.checkpoint.files import (
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    adapter_weights_path,
    read_adapter_weights,
    serialize_adapter_weights,
    write_adapter_weights,
)
from lntune.checkpoint.state_dict import (
    IncompatibleKeys,
    check_peft_model_state_dict,
    fill_adapter,
    get_peft_model_state_dict,
    load_into_adapter,
    set_peft_model_state_dict,
)

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "IncompatibleKeys",
    "adapter_weights_path",
    "check_peft_model_state_dict",
    "fill_adapter",
    "get_peft_model_state_dict",
    "load_into_adapter",
    "read_adapter_weights",
    "serialize_adapter_weights",
    "set_peft_model_state_dict",
    "write_adapter_weights",
]
