"""When a wrapper may call a module's ``forward`` directly: the one place lntune relies on torch internals.

``module(x)`` runs ``nn.Module.__call__``, which calls ``module.forward(x)`` straight away unless something
would observe the call: a forward or backward hook (on the module, or global), a compiled call
(``module.compile()``), or TorchScript tracing. An lntune wrapper skips that layer when none of these
is present, and calls the chosen module's ``forward`` itself: one Python call instead of two
``__call__`` layers per norm (`direct_call`, the wrappers' ``__call__``).

What a call checks is split in two, so that a wrapped call reads little more than the bare module's:

* **The wrapper's own state** (its hook dicts, its compiled call, its ``forward``) is not read per
  call. `watch_call_state` makes those attributes of the wrapper class observed: any access to them
  through the attribute (which registering a hook, ``compile()`` or replacing ``forward`` all make)
  disarms the direct call, and `arm` re-arms it after checking them again (the wrapper does so after
  its next call through ``nn.Module.__call__``, and whenever it selects what forward runs).
* **The chosen module, global hooks and tracing** are checked on every call (`direct_call`, the
  wrappers' ``__call__``), as ``nn.Module.__call__`` itself checks them for the bare module.

The test of this module (``tests/test_fast_call.py``) reads torch's ``nn.Module._call_impl`` and
``_wrapped_call_impl`` and fails if a torch release checks anything this module does not. If a torch
release lacks one of the attributes read here, `DIRECT_CALLS` is False: every call then goes through
``nn.Module.__call__`` (always right, a little slower), with one warning.

>>> layer = LNTuningLayer(nn.LayerNorm(4), "default")
>>> layer._direct is layer.ln_tuning_layers["default"]  # armed: layer(x) runs the copy's forward directly
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

#: The wrapper attribute holding the module its ``__call__`` runs directly, or ``None`` (disarmed).
DIRECT = "_direct"

#: The wrapper attribute holding what `select` chose: ``(module or callable, the forward set for it)``.
SELECTED = "_selected_forward"


def _torch_has_what_we_read() -> bool:
    probe = nn.Module()
    return (
        all(isinstance(getattr(_torch_module, name, None), dict) for name in GLOBAL_HOOKS)
        and all(isinstance(probe.__dict__.get(name), dict) for name in MODULE_HOOKS)
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


def direct_call(self: nn.Module, *args, **kwargs):
    """``__call__`` of a `watch_call_state` wrapper: the selected module's ``forward``, called directly.

    One Python call instead of ``nn.Module.__call__`` twice (the wrapper's, then the module's), when
    nothing would observe the difference: the wrapper is armed (``_direct`` is set: it has no hook and
    no compiled call, see `arm`), and the module has no hook and no compiled call, no global module
    hook is registered and TorchScript is not tracing, which is what ``nn.Module._call_impl`` checks
    before it calls ``forward`` straight away. Otherwise the wrapper's own ``nn.Module.__call__`` runs,
    hooks and all, and the direct call is re-armed if nothing observes it any more.

    The checks are written out here, not in a helper or a loop over the names above: they run once
    per wrapped module per forward, where a function call costs measurably more than they do
    (``benchmarks/results/cpu-bench_forward.md``). The module's hook dicts are read from its
    ``__dict__``, where every ``nn.Module`` keeps them (`arm` arms no other module).

    Args:
        self: The wrapper.
        *args: The call's positional arguments.
        **kwargs: The call's keyword arguments.

    Returns:
        What the module's forward returns.

    Example:
        >>> class Wrapper(nn.Module):
        ...     __call__ = direct_call
    """
    module = self._direct
    if module is not None:
        state = module.__dict__
        if not (
            state["_forward_hooks"]
            or state["_forward_pre_hooks"]
            or state["_backward_hooks"]
            or state["_backward_pre_hooks"]
            or (COMPILED_CALL in state and state[COMPILED_CALL] is not None)
            or _globals._global_forward_hooks
            or _globals._global_forward_pre_hooks
            or _globals._global_backward_hooks
            or _globals._global_backward_pre_hooks
            or _tracing()
        ):
            return module.forward(*args, **kwargs)
    out = nn.Module.__call__(self, *args, **kwargs)
    arm(self)
    return out


class _Watched:
    """A data descriptor for one attribute of a wrapper that ``nn.Module.__call__`` reads: any access
    through the attribute disarms the wrapper's direct call (the value itself stays in ``__dict__``,
    where pickling, ``deepcopy`` and ``nn.Module.__setstate__`` find it as usual)."""

    def __init__(self, name: str, disarm_on_read: bool = True) -> None:
        self.name = name
        # A hook dict is mutated after it is read (``self._forward_hooks[id] = hook``), so reading it
        # disarms; ``forward`` only changes by assignment.
        self.disarm_on_read = disarm_on_read

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        state = wrapper.__dict__
        if self.disarm_on_read:
            state[DIRECT] = None
        try:
            return state[self.name]
        except KeyError:
            if self.name == COMPILED_CALL:
                return None  # nn.Module's class default
            raise AttributeError(f"'{type(wrapper).__name__}' object has no attribute '{self.name}'") from None

    def __set__(self, wrapper, value) -> None:
        state = wrapper.__dict__
        state[DIRECT] = None
        state[self.name] = value


def watch_call_state(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls``'s hook dicts, compiled call and ``forward`` observed (see `_Watched`).

    Args:
        cls: A wrapper class whose ``__call__`` runs ``self._direct.forward`` when armed.

    Returns:
        ``cls``, with the descriptors set.

    Example:
        >>> @watch_call_state
        ... class Wrapper(nn.Module): ...
    """
    for name in (*MODULE_HOOKS, COMPILED_CALL):
        setattr(cls, name, _Watched(name))
    cls.forward = _Watched("forward", disarm_on_read=False)
    return cls


def select(wrapper: nn.Module, run) -> None:
    """Make ``run`` what ``wrapper``'s forward runs, and arm the direct call where nothing would observe it.

    ``wrapper.forward`` becomes ``run`` (``run.__call__`` for a module: a bound method, which assigning
    back to ``forward``, as accelerate's hooks do, does not register as a submodule).

    Args:
        wrapper: A `watch_call_state` class's instance.
        run: A module, or any callable (a mixed-batch or casting forward).

    Example:
        >>> select(wrapper, wrapper.base_layer)
    """
    forward = run.__call__ if isinstance(run, nn.Module) else run
    state = wrapper.__dict__
    state["forward"] = forward
    state[SELECTED] = (run, forward)
    arm(wrapper)


def arm(wrapper: nn.Module) -> None:
    """Arm ``wrapper``'s direct call if nothing observes it any more (after a call through ``nn.Module.__call__``).

    Armed (``wrapper._direct`` is the selected module) when what `select` chose is a module with
    ``nn.Module``'s own ``__call__`` and hook dicts, the wrapper has no hook and no compiled call, and its ``forward``
    was not replaced since. Reads the wrapper's state from ``__dict__``, so arming does not disarm.

    Args:
        wrapper: A `watch_call_state` class's instance that `select` has run on.

    Example:
        >>> arm(wrapper)
    """
    state = wrapper.__dict__
    run, forward = state[SELECTED]
    direct = (
        DIRECT_CALLS
        and isinstance(run, nn.Module)
        and type(run).__call__ is nn.Module.__call__
        and all(name in run.__dict__ for name in MODULE_HOOKS)
        and state.get("forward") is forward
        and state.get(COMPILED_CALL) is None
        and not any(state.get(name) for name in MODULE_HOOKS)
    )
    state[DIRECT] = run if direct else None
