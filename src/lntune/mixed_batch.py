"""Mixed-adapter batches: every sample of one forward runs through its own adapter.

The pieces here take modules, parameters and tensors, never a wrapper's internals; the wrappers
(`LNTuningLayer`, `ModulesToSaveWrapper`) choose among them:

* **per-sample affine** (`per_sample_norm`): a norm normalises the whole batch once and applies each
  sample's own weight and bias, gathered from the adapters' copies with one ``index_select`` per
  parameter. torch's ``LayerNorm``/``RMSNorm`` run functionally; other norms (``LlamaRMSNorm``...) run
  their own forward with per-sample parameters broadcast in.
* **per-sample linear** (`per_sample_linear`): a ``Linear`` head applies each sample's own weight in one
  batched matmul.
* **grouped** (`grouped_forward`): any other module runs once per adapter on its group of samples.

Classifier heads may have a different number of outputs per adapter (``add_adapter(..., num_labels=...)``).
A batch over heads of several sizes still runs as one batched matmul: each sample's head is padded to
the batch's largest, and the padded outputs hold the dtype's most negative finite value (`pad_logits`),
which softmax and cross-entropy give zero weight (never NaN). The grouped path pads the same way.

All three are differentiable, so a mixed batch trains every adapter it names. Their cost depends on
the batch (the adapters it names), never on how many adapters are resident.

A `BatchAdapters` lives for one forward or one ``generate`` and caches what does not change meanwhile:
each wrapper's modules, row indices and, without autograd, the gathered per-sample parameters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from lntune.precision import call_with_parameters

BASE_ADAPTER_NAME = "__base__"

#: Largest per-sample weight tensor (in elements) `per_sample_linear` gathers; bigger heads run grouped.
MAX_GATHERED_WEIGHT = 1 << 22


class HasModuleFor(Protocol):
    def module_for(self, adapter_name: str) -> nn.Module: ...


@dataclass(eq=False)
class BatchAdapters:
    """The adapter of each sample (or of each token): ``names`` (unique) and ``index[i]`` into them.

    Per sample (the default), ``index`` has one entry per sample: dimension 0 of every input. Per token
    (``per_token=True``), it has one entry per token: the first two dimensions of the inputs (batch and
    sequence) flattened, as in the packed row ``(1, T)`` of continuous batching or packed training.
    """

    names: list[str]
    index: torch.Tensor
    per_token: bool = False
    _cache: dict = field(default_factory=dict, repr=False)  # what depends on the index (rows, gathered parameters)
    _kept: dict = field(default_factory=dict, repr=False)  # what depends on the names only (modules, stacks)

    @classmethod
    def from_token_index(cls, names: Sequence[str], index: torch.Tensor) -> BatchAdapters:
        """Token ``t`` (of the flattened batch and sequence dimensions) runs adapter ``names[index[t]]``.

        Args:
            names: Adapter names (``"__base__"``: none), for example one per packed sequence (repeats allowed).
            index: Integer tensor with one entry per token, any shape (it is flattened): an index into ``names``.

        Example:
            >>> BatchAdapters.from_token_index(["a", "b"], torch.tensor([[0, 0, 1, 1, 1]])).per_token
            True
        """
        distinct = list(dict.fromkeys(names))
        if len(distinct) < len(names):  # one entry per packed sequence, say: map repeated names to one
            position = {name: i for i, name in enumerate(distinct)}
            index = torch.tensor([position[n] for n in names], dtype=torch.long)[index.reshape(-1).long()]
        batch = cls([], torch.empty(0, dtype=torch.long), per_token=True)
        batch.update(distinct, index)
        return batch

    def update(self, names: Sequence[str], index: torch.Tensor) -> None:
        """New contents for the next forwards; the object set on the wrappers stays, so no wrapper is touched.

        Continuous batching keeps one per-token `BatchAdapters` on the model and updates it before each step.
        While the names stay the same (steps of the same requests) the modules found for them, and without
        autograd the stacks of their parameters, are kept; call `forget` after changing adapters in place.
        """
        index = index.reshape(-1).to(torch.long)
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be distinct, got {list(names)}.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(names)):
            raise ValueError(f"adapter index values must be in [0, {len(names)}), got {index.min()}..{index.max()}.")
        if list(names) != self.names:
            self._kept.clear()
        self.names, self.index = list(names), index
        self._cache.clear()

    def forget(self) -> None:
        """Drop everything kept about the adapters (after adapters were loaded, unloaded or changed in place)."""
        self._kept.clear()
        self._cache.clear()

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], rows: int | None = None) -> BatchAdapters:
        """One entry per sample, for example ``["a", "b", "__base__", "a"]``.

        Args:
            adapter_names: The adapter of each sample (``"__base__"``: none).
            rows: The batch's number of samples, if known: ``adapter_names`` must have that many entries.

        Raises:
            TypeError: ``adapter_names`` is a string (one name per sample is needed).
            ValueError: its length is not ``rows``.
        """
        if isinstance(adapter_names, str):
            raise TypeError(
                f"adapter_names must be a list with one adapter name per sample, got the string {adapter_names!r}."
            )
        if rows is not None and len(adapter_names) != rows:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries, but the batch has {rows} samples; pass one adapter "
                f"name per sample ('{BASE_ADAPTER_NAME}' for the base model)."
            )
        names = list(dict.fromkeys(adapter_names))
        position = {name: i for i, name in enumerate(names)}
        return cls(names, torch.tensor([position[n] for n in adapter_names], dtype=torch.long))

    def modules_of(self, wrapper: HasModuleFor) -> list[nn.Module]:
        """``wrapper.module_for(name)`` for each of `names`, computed once per batch."""
        key = ("modules", id(wrapper))
        if key not in self._kept:
            self._kept[key] = [wrapper.module_for(name) for name in self.names]
        return self._kept[key]

    def check_tokens(self, x: torch.Tensor) -> None:
        """Per token: raise a clear error unless ``x``'s batch and sequence dimensions hold one row per token."""
        tokens = self.index.numel()
        if x.dim() < 2 or x.shape[0] * x.shape[1] != tokens:
            raise ValueError(
                f"The per-token adapter index covers {tokens} tokens, but a tuned module received an input of shape "
                f"{tuple(x.shape)}. Per-token adapters need every tuned module to see every token (batch and sequence "
                "first); a head that sees a subset of the tokens (an LM head under logits_to_keep) cannot follow "
                "them: keep it out of modules_to_save, or use one adapter per sample."
            )

    def index_for(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row adapter index for ``x``; rows may be repeated per sample (beams, returned sequences).

        Per token, ``x`` comes with its batch and sequence dimensions flattened into rows (see
        `lntune.wrapper.AdapterWrapper`): one row per token.
        """
        rows, samples = x.shape[0], self.index.numel()
        key = ("rows", x.device, rows)
        if key not in self._cache:
            if rows % samples:
                raise ValueError(
                    f"adapter_names has {samples} entries, but a tuned module received a batch of {rows} "
                    "rows; pass one adapter name per sample (dimension 0 of the inputs)."
                )
            self._cache[key] = self.index.repeat_interleave(rows // samples).to(x.device)
        return self._cache[key]

    def per_sample_parameters(
        self,
        owner: object,
        modules: list[nn.Module],
        shapes: dict[str, tuple[int, ...]],
        index: torch.Tensor,
        dtype: torch.dtype | None,
    ) -> dict[str, torch.Tensor | None]:
        """Parameter ``name`` of ``modules[index[i]]`` in row ``i``, in ``dtype``, viewed as ``shapes[name]``.

        ``modules`` are leaves with the same parameter names. Without autograd the result is kept for
        the rest of the batch (parameters do not change during one forward or one ``generate``), and the
        stacks of the parameters for as long as the names stay the same (see `update`).

        Args:
            owner: The wrapper asking (the cache key, with the shapes).
            modules: One module per adapter of the batch (`modules_of`).
            shapes: ``{parameter name: shape of the per-row view}``, rows first.
            index: Per-row index into ``modules`` (`index_for`).
            dtype: The dtype to compute in (``None``: the parameters' own).

        Returns:
            ``{name: tensor}``; ``None`` for a parameter the modules set to ``None`` (``bias=False``).
        """
        key = ("parameters", id(owner), tuple(shapes.items()))
        grad = torch.is_grad_enabled()
        if not grad and key in self._cache:
            return self._cache[key]
        out: dict[str, torch.Tensor | None] = {}
        for name, shape in shapes.items():
            stack_key = ("stack", id(owner), name, dtype)
            stacked = None if grad else self._kept.get(stack_key)
            if stacked is None:
                params = [m._parameters[name] for m in modules]  # leaves: faster than getattr
                if params[0] is None:
                    out[name] = None
                    continue
                stacked = torch.stack(params)  # differentiable: gradients reach each adapter's parameters
                if dtype is not None and stacked.dtype != dtype:
                    stacked = stacked.to(dtype)
                if not grad:
                    self._kept[stack_key] = stacked
            out[name] = stacked.index_select(0, index).view(shape)
        if not grad:
            self._cache[key] = out
        return out

    def per_sample_head(
        self, owner: object, modules: list[nn.Linear], index: torch.Tensor, dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The weight and bias of ``modules[index[i]]`` in row ``i``, padded to the largest head of the batch.

        Args:
            owner: The wrapper asking (the cache key).
            modules: One ``Linear`` per adapter of the batch (`modules_of`), same ``in_features``.
            index: Per-row index into ``modules`` (`index_for`).
            dtype: The dtype to compute in (``None``: the parameters' own).

        Returns:
            ``(weight, bias, padded)``: ``(rows, out, in)``, ``(rows, out)`` or None, and a boolean
            ``(rows, out)`` mask of the padded outputs (None when every head has ``out`` outputs), where
            ``out`` is the largest ``out_features`` of the batch. Padded weights and biases are zeros.
        """
        key = ("head", id(owner))
        grad = torch.is_grad_enabled()
        if not grad and key in self._cache:
            return self._cache[key]
        sizes = [m.weight.shape[0] for m in modules]
        widest = max(sizes)
        has_bias = modules[0].bias is not None
        if min(sizes) == widest:
            weight = torch.stack([m.weight for m in modules])
            bias = torch.stack([m.bias for m in modules]) if has_bias else None
            padded = None
        else:  # heads of several sizes: zero rows below each smaller head, masked afterwards
            weight = pad_sequence([m.weight for m in modules], batch_first=True)
            bias = pad_sequence([m.bias for m in modules], batch_first=True) if has_bias else None
            outputs = torch.arange(widest, device=weight.device)
            padded = outputs >= torch.tensor(sizes, device=weight.device).unsqueeze(1)
            padded = padded.index_select(0, index.to(weight.device))
        if dtype is not None and weight.dtype != dtype:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        out = (weight.index_select(0, index), None if bias is None else bias.index_select(0, index), padded)
        if not grad:
            self._cache[key] = out
        return out


def pad_logits(out: torch.Tensor, padded: torch.Tensor | None) -> torch.Tensor:
    """``out`` (rows first, outputs last) with the ``padded`` outputs of each row set to the dtype's most
    negative finite value: softmax gives them probability 0 and cross-entropy ignores them, without NaN.

    Example:
        >>> pad_logits(torch.zeros(2, 3), torch.tensor([[False, False, True], [False, False, False]]))[0, 2]
        tensor(-3.4028e+38)
    """
    if padded is None:
        return out
    view = padded.view(padded.shape[0], *([1] * (out.dim() - 2)), padded.shape[1])
    return out.masked_fill(view, torch.finfo(out.dtype).min)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first tensor among a call's arguments (its dimension 0 is the batch)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("A mixed-adapter batch needs a tensor input to find the batch dimension.")


def affine_parameters(module: nn.Module) -> tuple[list[str], tuple[int, ...]] | None:
    """``(parameter names, their shape)`` if ``module`` is a leaf without buffers whose parameters all have
    one shape (a norm's element-wise affine), else ``None``.

    Modules with buffers (batch norms' running statistics) are left out: their forward updates state.

    Example:
        >>> affine_parameters(nn.LayerNorm(8))
        (['weight', 'bias'], (8,))
    """
    if module._buffers or any(True for _ in module.children()):
        return None
    params = [(name, p) for name, p in module._parameters.items() if p is not None]
    if not params:
        return None
    shape = tuple(params[0][1].shape)
    if not shape or any(tuple(p.shape) != shape for _, p in params):
        return None
    return [name for name, _ in params], shape


def per_sample_affine(module: nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], tuple[int, ...]] | None:
    """The affine parameters a mixed batch gathers per sample for this call of ``module``, or ``None`` when the
    call runs grouped by adapter (`grouped_forward`).

    Per sample: a call on one tensor whose trailing dimensions have the shape of ``module``'s affine
    parameters (`affine_parameters`), of a class whose forward takes per-sample parameters
    (`broadcasts_per_sample`).

    Example:
        >>> per_sample_affine(nn.LayerNorm(8), (torch.ones(2, 3, 8),), {})
        (['weight', 'bias'], (8,))
    """
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        return None
    affine = affine_parameters(module)
    if affine is None:
        return None
    shape, x = affine[1], args[0]
    if len(shape) > x.dim() - 1 or tuple(x.shape[-len(shape) :]) != shape or not broadcasts_per_sample(module):
        return None
    return affine


def is_exact_norm(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """torch's LayerNorm/RMSNorm called on one tensor: `per_sample_norm` computes it functionally."""
    return type(module) in (nn.LayerNorm, nn.RMSNorm) and len(args) == 1 and not kwargs


#: Per norm class: whether its own forward applies per-sample parameters right (`broadcasts_per_sample`).
_BROADCASTS: dict[type, bool] = {nn.LayerNorm: True, nn.RMSNorm: True}


def broadcasts_per_sample(module: nn.Module) -> bool:
    """Whether ``module``'s class computes right with per-sample parameters broadcast into its own forward.

    Decided once per class, from the class alone: a float32 copy of ``module`` runs three samples with three
    different random parameter sets, once with the parameters broadcast per sample (`call_with`) and once
    each on its own, on the CPU. A class that fails (``LlamaRMSNorm`` and ``T5LayerNorm`` pass) runs
    mixed batches grouped by adapter from then on, which is right but slower; one warning names it.

    Args:
        module: A leaf norm whose parameters have the shape of its input's trailing dimensions.

    Returns:
        The class's verdict (torch's ``LayerNorm`` and ``RMSNorm``: True, they are computed functionally).

    Example:
        >>> broadcasts_per_sample(LlamaRMSNorm(8))
        True
    """
    kind = type(module)
    verdict = _BROADCASTS.get(kind)
    if verdict is None:
        verdict = _BROADCASTS[kind] = _probe_broadcast(module)
        if not verdict:
            warnings.warn(
                f"lntune: {kind.__module__}.{kind.__qualname__} does not compute per-sample weights in one call; "
                "mixed-adapter batches run it once per adapter of the batch (correct, slower).",
                stacklevel=4,
            )
    return verdict


def _probe_broadcast(module: nn.Module) -> bool:
    samples = 3
    try:
        with torch.no_grad(), torch.inference_mode(False):
            reference = copy.deepcopy(module).float().cpu()
            generator = torch.Generator().manual_seed(0)
            copies = []
            for _ in range(samples):
                tuned = copy.deepcopy(reference)
                for param in tuned.parameters():
                    param.copy_(1 + torch.randn(param.shape, generator=generator))
                copies.append(tuned)
            shape = next(reference.parameters()).shape
            x = torch.randn(samples, 2, *shape, generator=generator)
            names = [name for name, p in reference._parameters.items() if p is not None]
            params = {n: torch.stack([c._parameters[n] for c in copies]).view(samples, 1, *shape) for n in names}
            out = call_with(reference, params, (x,), {})
            expected = torch.cat([copies[i](x[i : i + 1]) for i in range(samples)])
            return (
                isinstance(out, torch.Tensor)
                and out.shape == expected.shape
                and torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
            )
    except Exception:  # any failure of the class's forward with broadcast parameters: not this path
        return False


def per_sample_norm(reference: nn.Module, params: dict[str, torch.Tensor | None], args: tuple, kwargs: dict):
    """``reference``'s forward with per-sample parameters ``params`` (shaped to broadcast over each row).

    torch's ``LayerNorm``/``RMSNorm`` normalise without their affine and then apply ``params``; any other
    module runs its own forward with ``params`` swapped in for the call (see `call_with`).

    Args:
        reference: A module of the type every adapter's copy has (the original).
        params: From `BatchAdapters.per_sample_parameters`.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.

    Returns:
        The module's output for the whole batch.
    """
    if not is_exact_norm(reference, args, kwargs):
        return call_with(reference, params, args, kwargs)
    x = args[0]
    dims = tuple(reference.normalized_shape)
    if type(reference) is nn.LayerNorm:
        # Unit weight and zero bias rather than None: torch's CPU kernel has a vectorised loop only for
        # the affine case (without, it is about 2x slower); the result is the same.
        unit, zero = unit_affine(dims, x.dtype, x.device)
        out = F.layer_norm(x, dims, unit, zero, reference.eps)
    else:
        out = F.rms_norm(x, dims, None, reference.eps)
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None:
        return out if bias is None else out + bias
    if bias is None:
        return out * weight
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return torch.addcmul(bias, out, weight)
    return torch.addcmul(bias, out, weight, out=out)  # no autograd: in place, one pass, no new buffer


@lru_cache(maxsize=64)
def unit_affine(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ones and zeros of ``shape`` (an identity affine for ``F.layer_norm``), made once per shape and dtype.

    Made outside inference mode, so that a later training forward may save them for backward.
    """
    with torch.inference_mode(False), torch.no_grad():
        return torch.ones(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of each row of ``x`` with its own ``weight[i]`` (and ``bias[i]``), as one batched matmul.

    Args:
        x: ``(rows, ..., in_features)``.
        weight: ``(rows, out_features, in_features)``.
        bias: ``(rows, out_features)`` or ``None``.

    Returns:
        ``(rows, ..., out_features)``.

    Example:
        >>> per_sample_linear(torch.ones(2, 3), torch.ones(2, 4, 3), None).shape
        torch.Size([2, 4])
    """
    rows, out_features = weight.shape[0], weight.shape[1]
    flat = x.reshape(rows, -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], out_features)


def can_run_linear_per_sample(modules: list[nn.Module], args: tuple, kwargs: dict) -> bool:
    """Whether `per_sample_linear` can run this call: plain ``Linear`` copies on one tensor, small enough
    (their output sizes may differ: see `BatchAdapters.per_sample_head`)."""
    if len(args) != 1 or kwargs or not all(type(m) is nn.Linear for m in modules):
        return False
    widest = max(m.weight.shape[0] for m in modules)
    return args[0].dim() >= 2 and args[0].shape[0] * widest * modules[0].weight.shape[1] <= MAX_GATHERED_WEIGHT


def call_with(module: nn.Module, params: dict[str, torch.Tensor | None], args: tuple, kwargs: dict):
    """Run the leaf ``module`` with ``params`` in place of its own parameters (put back afterwards)."""
    slots = [(module._parameters, name) for name in params]
    return call_with_parameters(module, slots, list(params.values()), args, kwargs)


def grouped_forward(runs: list[Callable], index: torch.Tensor, args: tuple, kwargs: dict, ragged: bool = False) -> Any:
    """Run ``runs[k](...)`` on the rows whose ``index`` is ``k`` and reassemble the batch.

    Every tensor argument whose first dimension equals the batch's is split the same way; other
    arguments are passed whole. Tensor outputs (alone or in a tuple/list) are put back in row order.

    Args:
        runs: One callable per adapter (a module, or a `CastCall` around one).
        index: The adapter of each row, as an index into ``runs``.
        args: Positional arguments of the call.
        kwargs: Keyword arguments of the call.
        ragged: The groups' outputs may differ in their last dimension (heads of several sizes): shorter
            floating outputs are padded to the longest with the dtype's most negative finite value.

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
    return _reassemble(outputs, inverse, ragged)


def _reassemble(outputs: list, inverse: torch.Tensor, ragged: bool = False):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if ragged and first.is_floating_point() and len({o.shape[-1] for o in outputs}) > 1:
            widest = max(o.shape[-1] for o in outputs)
            fill = torch.finfo(first.dtype).min
            outputs = [F.pad(o, (0, widest - o.shape[-1]), value=fill) for o in outputs]
        return torch.cat(outputs).index_select(0, inverse.to(first.device))
    if isinstance(first, (tuple, list)):
        parts = [_reassemble([o[i] for o in outputs], inverse, ragged) for i in range(len(first))]
        return type(first)(parts)
    return first
