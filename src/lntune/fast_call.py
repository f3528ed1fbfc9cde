"""When a wrapper may call a module's ``forward`` directly: the one place lntune relies on torch internals.

``module(x)`` runs ``nn.Module.__call__``, which calls ``module.forward(x)`` straight away unless something
would observe the call: a forward or backward hook (on the module, or global), a compiled call
(``module.compile()``), or TorchScript tracing. An lntune wrapper skips that layer when none of these
is present, and calls the chosen module's ``forward`` itself: one Python call instead of two
``__call__`` layers per norm (see `lntune.wrapper.AdapterWrapper.__call__`).

The test of this module (``tests/test_fast_call.py``) reads torch's ``nn.Module._call_impl`` and
``_wrapped_call_impl`` and fails if a torch release checks anything this module does not. If a torch
release lacks one of the attributes read here, `DIRECT_CALLS` is False: every call then goes through
``nn.Module.__call__`` (always right, a little slower), with one warning.

>>> direct_call_allowed(wrapper, wrapper.base_layer)
True
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

#: The per-module hook dicts that ``nn.Module._call_impl`` checks before calling ``forward``.
MODULE_HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_pre_hooks")

#: The global hook dicts of ``torch.nn.modules.module`` that it checks too.
GLOBAL_HOOKS = (
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
)

#: The attribute ``nn.Module._wrapped_call_impl`` calls instead of ``_call_impl`` when set (``module.compile()``).
COMPILED_CALL = "_compiled_call_impl"


def _torch_has_what_we_read() -> bool:
    probe = nn.Module()
    return (
        all(isinstance(getattr(_torch_module, name, None), dict) for name in GLOBAL_HOOKS)
        and all(isinstance(getattr(probe, name, None), dict) for name in MODULE_HOOKS)
        and hasattr(probe, COMPILED_CALL)
        and callable(getattr(torch._C, "_get_tracing_state", None))
    )


#: Whether wrappers may call forward directly (False if this torch lacks an attribute read here).
DIRECT_CALLS = _torch_has_what_we_read()
if not DIRECT_CALLS:
    warnings.warn(
        f"lntune: this torch ({torch.__version__}) lacks a module attribute lntune's fast call reads; adapter "
        "wrappers go through nn.Module.__call__ (correct, slightly slower). Please report it.",
        RuntimeWarning,
        stacklevel=2,
    )

_globals = _torch_module
_tracing = torch._C._get_tracing_state if DIRECT_CALLS else None


def direct_call_allowed(wrapper: nn.Module, module: nn.Module) -> bool:
    """Whether ``module.forward(...)`` does exactly what ``wrapper(...)`` would (``wrapper`` runs ``module``).

    True when neither module has a hook or a compiled call, no global module hook is registered and
    TorchScript is not tracing: then ``nn.Module.__call__`` of both would call ``forward`` straight away.

    Args:
        wrapper: The adapter wrapper being called.
        module: The module its forward would run.

    Returns:
        Whether the direct call is allowed (always False when `DIRECT_CALLS` is False).

    Example:
        >>> direct_call_allowed(layer, layer.base_layer)
        True
    """
    if not DIRECT_CALLS:
        return False
    # Written out rather than looped over the names above: this runs once per wrapped module per forward.
    return not (
        wrapper._forward_hooks
        or wrapper._forward_pre_hooks
        or wrapper._backward_hooks
        or wrapper._backward_pre_hooks
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or wrapper._compiled_call_impl is not None
        or module._compiled_call_impl is not None
        or _globals._global_forward_hooks
        or _globals._global_forward_pre_hooks
        or _globals._global_backward_hooks
        or _globals._global_backward_pre_hooks
        or _tracing()
    )
