"""When a wrapper may call a module's ``forward`` directly: the one place lntune relies on torch internals.

``module(x)`` runs ``nn.Module.__call__``, which calls ``module.forward(x)`` straight away unless something
would observe the call: a forward or backward hook (on the module, or global), a compiled call
(``module.compile()``), or TorchScript tracing. An lntune wrapper skips that layer when none of these
is present, and calls the chosen module's ``forward`` itself: one Python call instead of two
``__call__`` layers per norm (`direct_call`, the wrappers' ``__call__``).

What a call checks is split in two, so that a wrapped call reads little more than the bare module's:

* **The wrapper's own state** (its hook dicts, its compiled call, its ``forward``) is not read per
  call but watched (`watch`, `watched_setattr`): the wrapper's hook dicts are `WatchedHooks`, which disarm
  the direct call of every wrapper holding them when an entry is added (as ``register_forward_hook``
  and the other ``register_*`` methods do), and assigning the compiled call, ``forward`` or a hook
  dict disarms it too. `arm` re-arms it after checking them again: after the wrapper's next call
  through ``nn.Module.__call__``, and whenever it selects what forward runs. Reading them has no
  effect (``torch.compile`` reads them while it traces).
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
import weakref
from collections import OrderedDict

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

#: The wrapper attribute holding what `select` chose: the module, or any callable, its forward runs.
SELECTED = "_selected_forward"

#: The wrapper attribute saying whether that choice could ever be called directly (a plain module).
ARMABLE = "_armable"

#: The wrapper attribute set when a hook dict that is not a `WatchedHooks` was assigned: never armed again.
UNWATCHED = "_hooks_unwatched"


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
    """``__call__`` of an lntune wrapper: the selected module's ``forward``, called directly.

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
    if module is None and self._armable:  # disarmed by the wrapper's own state: look again
        arm(self)
    return out


class WatchedHooks(OrderedDict):
    """A wrapper's hook dict: adding an entry disarms the direct call of every wrapper that holds it.

    ``nn.Module`` registers a hook by ``self._forward_hooks[handle.id] = hook`` (``update`` and
    ``setdefault`` go through ``__setitem__`` too), so whoever adds a hook, through whichever
    reference to the dict, disarms the wrappers. Pickled and copied as a plain ``OrderedDict`` of the
    same entries, without its holders: the wrapper that unpickles it watches it again (`watch`).
    """

    def __init__(self, *args, **kwargs) -> None:
        self._holders: weakref.WeakSet = weakref.WeakSet()
        super().__init__(*args, **kwargs)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        for holder in list(self._holders):
            holder.__dict__[DIRECT] = None

    def __reduce__(self):
        return (WatchedHooks, (), None, None, iter(self.items()))


def watch(wrapper: nn.Module) -> None:
    """Make ``wrapper``'s hook dicts `WatchedHooks` held by it (after ``__init__``, unpickling or a copy).

    A hook dict that is already a `WatchedHooks` (shared with the wrapper this one was copied from)
    is kept, and ``wrapper`` is added to its holders; a plain one is replaced by a `WatchedHooks`
    of the same entries.

    Args:
        wrapper: A wrapper class's instance (``__setattr__ = watched_setattr``), right after
            ``nn.Module.__init__``, or unpickled.

    Example:
        >>> watch(wrapper)
    """
    state = wrapper.__dict__
    for name in MODULE_HOOKS:
        hooks = state.get(name)
        if not isinstance(hooks, WatchedHooks):
            hooks = state[name] = WatchedHooks(hooks or ())
        hooks._holders.add(wrapper)


def watched_setattr(wrapper: nn.Module, name: str, value) -> None:
    """``nn.Module.__setattr__``, disarming the direct call when ``name`` is what it watches.

    Assigning ``forward`` (accelerate's hooks do) or the compiled call (``compile()``) disarms until
    `arm` finds them back as they were. A hook dict assigned in place of the watched one is watched if
    it is a `WatchedHooks`; any other dict could be filled through a reference lntune cannot see, so
    the wrapper then never calls directly again.

    A wrapper class sets ``__setattr__ = watched_setattr``.

    Args:
        wrapper: The wrapper.
        name: The attribute assigned.
        value: Its new value.
    """
    state = wrapper.__dict__
    if name in MODULE_HOOKS or name in (COMPILED_CALL, "forward"):
        state[DIRECT] = None
    nn.Module.__setattr__(wrapper, name, value)
    if name in MODULE_HOOKS:
        if isinstance(value, WatchedHooks):
            value._holders.add(wrapper)
        else:
            state[UNWATCHED] = True


def _forward_is_own(wrapper: nn.Module) -> bool:
    """Whether ``wrapper.forward`` is its class's own method (not replaced, or put back as accelerate does)."""
    forward = wrapper.__dict__.get("forward")
    if forward is None:
        return True
    return getattr(forward, "__self__", None) is wrapper and getattr(forward, "__func__", None) is type(wrapper).forward


def select(wrapper: nn.Module, run) -> None:
    """Make ``run`` what ``wrapper``'s forward runs, and arm the direct call where nothing would observe it.

    Args:
        wrapper: A wrapper class's instance (``__call__ = direct_call``, ``__setattr__ = watched_setattr``).
        run: A module, or any callable (a mixed-batch or casting forward).

    Example:
        >>> select(wrapper, wrapper.base_layer)
    """
    state = wrapper.__dict__
    state[SELECTED] = run
    state[ARMABLE] = (
        DIRECT_CALLS
        and isinstance(run, nn.Module)
        and type(run).__call__ is nn.Module.__call__
        and all(name in run.__dict__ for name in MODULE_HOOKS)
    )
    arm(wrapper)


def arm(wrapper: nn.Module) -> None:
    """Arm ``wrapper``'s direct call if nothing observes it any more, else disarm it.

    Armed (``wrapper._direct`` is the selected module) when what `select` chose is a module with
    ``nn.Module``'s own ``__call__`` and hook dicts, the wrapper's hook dicts are watched and empty, it
    has no compiled call, and its ``forward`` is its class's own. Writes only when that changes (a
    write inside ``torch.compile``'s trace is a side effect it must replay).

    Args:
        wrapper: A wrapper class's instance that `select` has run on.

    Example:
        >>> arm(wrapper)
    """
    state = wrapper.__dict__
    direct = (
        state[ARMABLE]
        and not state.get(UNWATCHED)
        and state.get(COMPILED_CALL) is None
        and not any(state[name] for name in MODULE_HOOKS)
        and _forward_is_own(wrapper)
    )
    armed = state[SELECTED] if direct else None
    if DIRECT not in state or state[DIRECT] is not armed:
        state[DIRECT] = armed
