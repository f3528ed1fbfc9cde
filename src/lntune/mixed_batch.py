"""Mixed-adapter batches: every sample of one forward runs through its own adapter.

Norm layers (``nn.LayerNorm``, ``nn.RMSNorm`` and element-wise-affine norms such as ``LlamaRMSNorm``)
normalise the whole batch once and apply each sample's own weight and bias, gathered from a stack of
the adapters' parameters. For norms other than torch's, that means running their own forward with
per-sample parameters; the first such call on a layer is checked against the grouped path, which the
layer keeps using if they differ. Any other module (and modules_to_save) runs once per adapter on its
group of samples. Both paths are differentiable, so a mixed batch trains every adapter it names.

A `BatchAdapters` lives for one forward or one ``generate``; it caches what does not change meanwhile
(each wrapper's modules, row indices, and, without autograd, the stacked per-sample parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lntune.layer import LNTuningLayer

BASE_ADAPTER_NAME = "__base__"


@dataclass
class BatchAdapters:
    """The adapter of each sample: ``names`` (unique, first-seen order) and ``index[i]`` into them."""

    names: list[str]
    index: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str]) -> BatchAdapters:
        names = list(dict.fromkeys(adapter_names))
        position = {name: i for i, name in enumerate(names)}
        return cls(names, torch.tensor([position[n] for n in adapter_names], dtype=torch.long))

    def modules_of(self, wrapper: nn.Module) -> list[nn.Module]:
        """What ``wrapper`` (an LN tuning layer or modules_to_save wrapper) runs for each of `names`.

        Cached for the life of this batch (one forward or one generate), during which adapters do not change.
        """
        key = id(wrapper)
        if key not in self._cache:
            self._cache[key] = wrapper.modules_for(self.names)  # "__base__" is never an adapter's name
        return self._cache[key]

    def index_for(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row adapter index for ``x``; rows may be repeated per sample (beams, returned sequences)."""
        rows, samples = x.shape[0], self.index.numel()
        key = (x.device, rows)
        if key not in self._cache:
            if rows % samples:
                raise ValueError(
                    f"adapter_names has {samples} entries, but a tuned module received a batch of {rows} "
                    "rows; pass one adapter name per sample (dimension 0 of the inputs)."
                )
            self._cache[key] = self.index.repeat_interleave(rows // samples).to(x.device)
        return self._cache[key]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("A mixed-adapter batch needs a tensor input to find the batch dimension.")


def check_batch_size(adapter_names: Sequence[str] | None, args: tuple, kwargs: dict) -> None:
    """Raise unless ``adapter_names`` has one entry per sample of the first tensor input (dimension 0).

    Args:
        adapter_names: One adapter name per sample, or ``None`` (nothing to check).
        args: Positional inputs of the forward / generate call.
        kwargs: Keyword inputs of the call.

    Example:
        >>> check_batch_size(["a", "b"], (), {"input_ids": torch.ones(2, 5, dtype=torch.long)})
    """
    if adapter_names is None:
        return
    if isinstance(adapter_names, str):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per sample, got the string {adapter_names!r}."
        )
    rows = _first_tensor(args, kwargs).shape[0]
    if len(adapter_names) != rows:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries, but the batch has {rows} samples; pass one adapter "
            f"name per sample ('{BASE_ADAPTER_NAME}' for the base model)."
        )


def mixed_forward(layer: LNTuningLayer, batch: BatchAdapters, *args, **kwargs):
    """Forward of ``layer`` with one adapter per sample (see the module docstring)."""
    x = _first_tensor(args, kwargs)
    index = batch.index_for(x)
    modules = batch.modules_of(layer)
    if len({id(m) for m in modules}) == 1:
        return layer.runner_for(modules[0])(*args, **kwargs)
    out = _affine_forward(layer, batch, index, x, args, kwargs)
    if out is not None:
        return out
    return grouped_forward([layer.runner_for(m) for m in modules], index, args, kwargs)


def _stacked(modules: list[nn.Module], name: str, index: torch.Tensor, dtype, shape) -> torch.Tensor | None:
    """Row ``i`` holds parameter ``name`` of ``modules[index[i]]``, in ``dtype``, viewed as ``shape``."""
    params = [m._parameters[name] for m in modules]  # leaf modules; faster than getattr
    if params[0] is None:
        return None
    # index_select and skipping no-op casts: each saves microseconds per call over [index] and .to().
    params = [p if p.dtype == dtype else p.to(dtype) for p in params]
    return torch.stack(params).index_select(0, index).view(*shape)


def _per_sample(layer: LNTuningLayer, batch: BatchAdapters, names: list[str], index, shape) -> dict:
    """``{name: per-sample parameter}`` for `_stacked`; reused within the batch when no gradient is needed.

    Parameters do not change during one forward or one ``generate``, so inference (and every step of
    generation) stacks them once per layer.
    """
    key = ("per_sample", id(layer), shape)
    grad = torch.is_grad_enabled()
    if not grad and key in batch._cache:
        return batch._cache[key]
    modules = batch.modules_of(layer)
    params = {name: _stacked(modules, name, index, layer.compute_dtype, shape) for name in names}
    if not grad:
        batch._cache[key] = params
    return params


def _call_with(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """Run the leaf ``module`` with ``params`` in place of its own parameters (put back afterwards)."""
    slots = module._parameters
    saved = dict(slots)
    try:
        slots.update(params)
        return module(*args, **kwargs)
    finally:
        slots.update(saved)


def _affine_forward(layer: LNTuningLayer, batch: BatchAdapters, index, x, args, kwargs) -> torch.Tensor | None:
    """Normalise once, then apply per-sample parameters; ``None`` where that does not apply."""
    ref = layer.original_module
    if type(ref) in (nn.LayerNorm, nn.RMSNorm) and len(args) == 1 and not kwargs:
        dims = tuple(ref.normalized_shape)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(dims)) + dims
        params = _per_sample(
            layer, batch, ["weight", "bias"] if type(ref) is nn.LayerNorm else ["weight"], index, shape
        )
        weight, bias = params["weight"], params.get("bias")
        if type(ref) is nn.LayerNorm:
            out = F.layer_norm(x, dims, None, None, ref.eps)
        else:
            out = F.rms_norm(x, dims, None, ref.eps)
        if weight is not None:
            out = out * weight
        return out if bias is None else out + bias
    names = _affine_parameter_names(layer, ref, x.shape[-1])
    if names is None:
        return None
    verified = getattr(layer, "_broadcast_verified", None)
    if verified is False:
        return None
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    params = _per_sample(layer, batch, names, index, shape)
    try:
        out = _call_with(ref, params, args, kwargs)
    except (RuntimeError, ValueError):
        out = None
    if verified is None:
        # First use on this layer: check the broadcast against the always-correct grouped path once.
        grouped = grouped_forward([layer.runner_for(m) for m in batch.modules_of(layer)], index, args, kwargs)
        ok = (
            isinstance(out, torch.Tensor)
            and out.shape == grouped.shape
            and torch.allclose(out.float(), grouped.float(), rtol=1e-3, atol=1e-5)
        )
        object.__setattr__(layer, "_broadcast_verified", ok)
        return grouped
    return out


def _affine_parameter_names(layer: LNTuningLayer, ref: nn.Module, width: int) -> list[str] | None:
    """``ref``'s parameter names if it is a leaf whose parameters are all vectors of ``width``, else None.

    Remembered on the layer (the answer depends only on the module and the width), since every
    forward of a mixed batch asks again.
    """
    key = (id(ref), width)
    cached = getattr(layer, "_affine_names", None)
    if cached is None or cached[0] != key:
        params = dict(ref.named_parameters())
        leaf = not any(True for _ in ref.children())
        fits = bool(params) and all(p.dim() == 1 and p.shape[0] == width for p in params.values())
        cached = (key, list(params) if leaf and fits else None)
        object.__setattr__(layer, "_affine_names", cached)
    return cached[1]


def grouped_forward(runs: list[Callable], index: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """Run ``runs[k](...)`` on the rows whose ``index`` is ``k`` and reassemble the batch.

    Every tensor argument whose first dimension equals the batch's is split the same way; other
    arguments are passed whole. Tensor outputs (alone or in a tuple/list) are put back in row order.

    Args:
        runs: One callable per adapter (a module, or a `CastCall` around one).
        index: The adapter of each row, as an index into ``runs``.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.

    Returns:
        The outputs of the groups, reassembled in row order.

    Example:
        >>> grouped_forward([torch.nn.Identity(), torch.neg], torch.tensor([1, 0]), (torch.ones(2, 3),), {})[:, 0]
        tensor([-1.,  1.])
    """
    rows = index.numel()
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=len(runs)).tolist()

    def split(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value.index_select(0, order).split(counts)
        return None

    split_args = [split(a) for a in args]
    split_kwargs = {k: split(v) for k, v in kwargs.items()}
    outputs = []
    for k, count in enumerate(counts):
        if count == 0:
            continue
        sub_args = [a if s is None else s[k] for a, s in zip(args, split_args)]
        sub_kwargs = {key: v if split_kwargs[key] is None else split_kwargs[key][k] for key, v in kwargs.items()}
        outputs.append(runs[k](*sub_args, **sub_kwargs))
    inverse = torch.argsort(order)
    return _reassemble(outputs, inverse)


def _reassemble(outputs: list, inverse: torch.Tensor):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs).index_select(0, inverse.to(first.device))
    if isinstance(first, (tuple, list)):
        parts = [_reassemble([o[i] for o in outputs], inverse) for i in range(len(first))]
        return type(first)(parts)
    return first
