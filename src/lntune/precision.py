"""Float32 adapters on float16/bfloat16 models: keep the copies in float32, compute in the model's dtype.

In bfloat16 a weight near 1.0 moves in steps of ~0.008, so AdamW updates of ~1e-4 round away. The
copies therefore store float32 parameters; `CastCall` runs a copy with its parameters cast
(differentiably) to the model's dtype, so activations and outputs keep that dtype and gradients reach
the float32 parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LOW_PRECISION = (torch.float16, torch.bfloat16)


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating parameter (``None`` if it has none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def upcast_parameters(module: nn.Module) -> None:
    """Store ``module``'s float16/bfloat16 parameters in float32, in place (buffers keep their dtype).

    Buffers are left alone: running statistics are updated in place by forward, which must not happen
    on a temporary cast.
    """
    for param in module.parameters():
        if param.dtype in LOW_PRECISION:
            param.data = param.data.float()


class CastCall:
    """Calls ``module`` with its floating parameters cast to ``dtype`` for the duration of the call.

    The cast tensors are put in the modules' ``_parameters`` slots and the parameters put back after
    the call, so the module's own forward runs unchanged; the cast is an autograd op, so gradients
    flow to the stored parameters. This costs one ``.to()`` per parameter (about 3 us on CPU), much
    less than ``torch.func.functional_call``. Without autograd (inference, decoding) the cast copies
    are kept and reused until a parameter changes (its storage or its version counter: an optimizer
    step, a hot-swap, a load), so a decode step launches no cast kernels.

    Args:
        module: The module to run.
        dtype: The dtype its parameters are seen in during the call.

    Example:
        >>> norm = torch.nn.LayerNorm(4)  # float32 parameters
        >>> CastCall(norm, torch.bfloat16)(torch.ones(2, 4, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.module = module
        self.dtype = dtype
        self.slots = [
            (sub._parameters, name)
            for sub in module.modules()
            for name, param in sub._parameters.items()
            if param is not None and param.is_floating_point() and param.dtype != dtype
        ]
        self._kept: list[torch.Tensor] = []
        self._kept_of: list[tuple] = []

    def __call__(self, *args, **kwargs):
        params = [slots[name] for slots, name in self.slots]
        if torch.is_grad_enabled():
            cast = [param.to(self.dtype) for param in params]
        else:
            cast = self._kept_casts(params)
        return call_with_parameters(self.module, self.slots, cast, args, kwargs)

    def _kept_casts(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The casts of ``params``, made again only when one of them changed since they were made."""
        of = [(p, p.data_ptr(), p._version) for p in params]
        if len(of) != len(self._kept_of) or any(a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(of, self._kept_of)):
            with torch.inference_mode(False):  # usable later outside inference mode, too
                self._kept = [param.detach().to(self.dtype) for param in params]
            self._kept_of = of
        return self._kept


def call_with_parameters(
    module: nn.Module, slots: list[tuple[dict, str]], values: list[torch.Tensor | None], args: tuple, kwargs: dict
):
    """``module(*args, **kwargs)`` with ``values[i]`` in parameter slot ``slots[i]`` during the call.

    The module's own forward runs unchanged on the tensors put in its ``_parameters`` slots (cast copies,
    per-sample stacks); the parameters are put back afterwards, whatever happens.

    Args:
        module: The module to call.
        slots: ``(submodule._parameters, name)`` pairs.
        values: One tensor (or None) per slot.
        args, kwargs: The call's arguments.

    Returns:
        The module's output.

    Example:
        >>> norm = torch.nn.LayerNorm(4)
        >>> call_with_parameters(norm, [(norm._parameters, "bias")], [torch.ones(4)], (torch.zeros(1, 4),), {})
        tensor([[1., 1., 1., 1.]], grad_fn=<NativeLayerNormBackward0>)
    """
    saved = [params[name] for params, name in slots]
    try:
        for (params, name), value in zip(slots, values):
            params[name] = value
        return module(*args, **kwargs)
    finally:
        for (params, name), value in zip(slots, saved):
            params[name] = value


def runner(module: nn.Module, dtype: torch.dtype | None) -> Callable:
    """``module`` itself if all its floating parameters are in ``dtype`` (or ``dtype`` is None), else a `CastCall`."""
    if dtype is None:
        return module
    call = CastCall(module, dtype)
    return call if call.slots else module
