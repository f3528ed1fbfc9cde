"""What each adapter wrapper holds and whether it is active, merged, enabled, trainable: PEFT's status reports.

`get_layer_status` and `get_model_status` return `TunerLayerStatus` / `TunerModelStatus`, with the fields
(and meanings) of PEFT's dataclasses of the same names, so code written against PEFT's reports reads these.
Where the adapters disagree across layers, the model report says ``"irregular"``, as PEFT's does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lntune.model import tuner_of
from lntune.wrapper import AdapterWrapper, named_wrappers

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """The state of one wrapped module (an `LNTuningLayer` or a `ModulesToSaveWrapper`).

    Attributes:
        name: The module's name, relative to the tuner (``"model.layers.0.input_layernorm"``).
        module_type: ``"ln_tuning.LNTuningLayer"`` or the modules_to_save wrapper's name.
        enabled: False while adapters are disabled (`disable_adapter`, ``disable_adapter_layers``).
        active_adapters: The adapters this wrapper runs.
        merged_adapters: The adapter merged into the base module, if any.
        requires_grad: Per adapter: True / False when all its parameters agree, else ``"irregular"``.
        available_adapters: The adapters with a copy in this wrapper (sorted).
        devices: Per adapter: the device types of its parameters (``["cpu"]``).
        quantization_backend: Always None (lntune copies modules; it has no quantized adapter layers).
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The state of a whole model: the layers' reports, combined.

    Attributes:
        base_model_type: The class name of the model that holds the wrappers (``"LlamaForCausalLM"``).
        adapter_model_type: ``"LNTuningModel"`` for a `PeftModel`, ``"None"`` for a model from
            ``inject_adapter_in_model``.
        peft_types: ``{adapter name: "LN_TUNING"}`` (empty without a `PeftModel`).
        trainable_params: Parameters that require grad.
        total_params: All parameters, adapter copies included.
        num_adapter_layers: The number of wrapped modules.
        enabled: True / False when all wrappers agree, else ``"irregular"``.
        active_adapters: The active adapters when all wrappers agree, else ``"irregular"``.
        merged_adapters: The merged adapters, or ``"irregular"`` if some layer holding one is not merged.
        requires_grad: Per adapter: True / False when all its parameters agree, else ``"irregular"``.
        available_adapters: Every adapter name found in a wrapper (sorted).
        devices: Per adapter: the device types of its parameters.
        quantization_backend: Always None.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agreement(values: Iterable) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(name: str, module: AdapterWrapper) -> TunerLayerStatus:
    adapters = sorted(module._all_available_adapter_names())
    tuned = {adapter: list(module.tuned_module(adapter).parameters()) for adapter in adapters}
    return TunerLayerStatus(
        name=name,
        module_type=repr(module).partition("(")[0],
        enabled=not module.disable_adapters,
        active_adapters=list(module.active_adapters),
        merged_adapters=list(module.merged_adapters),
        requires_grad={a: _agreement(p.requires_grad for p in params) for a, params in tuned.items()},
        available_adapters=adapters,
        devices={a: sorted({p.device.type for p in params}) for a, params in tuned.items()},
        quantization_backend=None,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every wrapped module of ``model``, in module order.

    Args:
        model: A `PeftModel`, or a model given to ``inject_adapter_in_model``.

    Returns:
        One `TunerLayerStatus` per `LNTuningLayer` and `ModulesToSaveWrapper`.

    Raises:
        ValueError: ``model`` holds no lntune adapter.

    Example:
        >>> [s.name for s in get_layer_status(peft_model)]
        ['model.model.layers.0.input_layernorm', ...]
    """
    root = tuner_of(model) or model
    statuses = [_layer_status(name, module) for name, module in named_wrappers(root)]
    if not statuses:
        raise ValueError(
            f"No adapter layers found in the model ({type(model).__name__}): pass a PeftModel from get_peft_model / "
            "from_pretrained, or a model given to inject_adapter_in_model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state over the whole model (PEFT's ``get_model_status``).

    Args:
        model: A `PeftModel`, or a model given to ``inject_adapter_in_model``.

    Returns:
        A `TunerModelStatus`; a field whose layers disagree is ``"irregular"``.

    Raises:
        ValueError: ``model`` holds no lntune adapter.

    Example:
        >>> status = get_model_status(peft_model)
        >>> status.active_adapters, status.merged_adapters, status.requires_grad
        (['default'], [], {'default': True})
    """
    layers = get_layer_status(model)
    tuner = tuner_of(model)
    if tuner is not None and tuner is not model:  # a PeftModel
        base_model_type = type(tuner.model).__name__
        adapter_model_type = type(tuner).__name__
        peft_types = {name: str(config.peft_type) for name, config in tuner.peft_config.items()}
    else:
        base_model_type, adapter_model_type, peft_types = type(model).__name__, "None", {}
    params = list(model.parameters())

    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged = sorted({a for s in layers for a in s.merged_adapters})
    merged_everywhere = all(set(merged).isdisjoint(set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    grads: dict[str, list[bool | Irregular]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            grads[adapter].append(value)
        for adapter, types in status.devices.items():
            devices[adapter].update(types)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged if merged_everywhere else "irregular",
        requires_grad={adapter: _agreement(values) for adapter, values in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={adapter: sorted(types) for adapter, types in devices.items()},
        quantization_backend=None,
    )
