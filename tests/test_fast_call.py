"""The wrappers' direct forward call against torch's own ``nn.Module.__call__``: fails loudly when torch changes.

`lntune.fast_call` lets a wrapper call the chosen module's ``forward`` directly when torch's ``__call__``
would do nothing else. These tests read torch's source for what ``__call__`` checks, so that a torch
release that adds a hook kind (or another reason not to call ``forward`` straight away) fails here
instead of silently skipping that hook; and they check that every kind of hook is still honoured.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import pickle
import textwrap
from unittest import mock

import pytest
import torch
from torch import nn

from lntune import LNTuningLayer, fast_call


def _names_in(node: ast.AST) -> set[str]:
    """Attribute and variable names read in ``node`` (``self._forward_hooks`` -> ``_forward_hooks``)."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            names.add(sub.attr)
        elif isinstance(sub, ast.Name):
            names.add(sub.id)
    return names


def test_torch_checks_exactly_the_hooks_lntune_checks():
    assert fast_call.DIRECT_CALLS, "this torch lacks an attribute lntune.fast_call reads"
    tree = ast.parse(textwrap.dedent(inspect.getsource(nn.Module._call_impl)))
    function = tree.body[0]
    # The fast exit of _call_impl: `if not (hooks...): return forward_call(*args, **kwargs)`.
    early = [
        node
        for node in function.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.UnaryOp)
        and isinstance(node.test.op, ast.Not)
        and isinstance(node.body[0], ast.Return)
    ]
    assert len(early) == 1, "torch's nn.Module._call_impl no longer has one early 'if not (hooks): return forward'"
    checked = _names_in(early[0].test)
    assert checked == set(fast_call.MODULE_HOOKS) | set(fast_call.GLOBAL_HOOKS) | {"self"}, (
        f"torch's __call__ now checks {sorted(checked)}; update lntune.fast_call"
    )
    # What forward_call is: the traced slow path while TorchScript traces, else forward.
    assert "_get_tracing_state" in _names_in(function.body[0]) and "_slow_forward" in _names_in(function.body[0])


def test_call_goes_through_wrapped_call_impl_and_its_compiled_call():
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl
    source = inspect.getsource(nn.Module._wrapped_call_impl)
    assert fast_call.COMPILED_CALL in source and "_call_impl" in source
    assert set(_names_in(ast.parse(textwrap.dedent(source)))) <= {
        "self",
        "args",
        "kwargs",
        fast_call.COMPILED_CALL,
        "_call_impl",
        "_wrapped_call_impl",
    }, "nn.Module._wrapped_call_impl reads something new; update lntune.fast_call"


def test_direct_call_checks_what_torch_checks():
    """`direct_call` writes its checks out (no loop, no helper); they must name exactly what torch checks."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fast_call.direct_call)))
    checks = [node for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp)]
    assert len(checks) == 1
    strings = {n.value for n in ast.walk(checks[0].test) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert strings == set(fast_call.MODULE_HOOKS)
    names = _names_in(checks[0].test)
    assert set(fast_call.GLOBAL_HOOKS) <= names and "COMPILED_CALL" in names and "_tracing" in names


def _layer() -> LNTuningLayer:
    layer = LNTuningLayer(nn.LayerNorm(4), "default")
    layer.set_adapter("default")
    return layer


def _call(layer: nn.Module, x: torch.Tensor | None = None) -> tuple[bool, torch.Tensor]:
    """Call ``layer`` once: whether it ran the forward directly (not ``nn.Module.__call__``), and its output."""
    slow = []
    torch_call = nn.Module.__call__

    def recording_call(module, *args, **kwargs):
        if module is layer:
            slow.append(module)
        return torch_call(module, *args, **kwargs)

    with mock.patch.object(nn.Module, "__call__", recording_call):
        out = layer(torch.randn(2, 4) if x is None else x)
    return not slow, out


def test_no_hook_calls_forward_directly():
    layer = _layer()
    assert layer._direct is layer.tuned_module("default")
    direct, out = _call(layer, torch.ones(2, 4))
    assert direct and torch.equal(out, layer.tuned_module("default")(torch.ones(2, 4)))


def _record(seen: list):
    return lambda *args: seen.append(args[0])  # the module the hook saw


HOOKS = {
    "module forward hook": lambda m, seen: m.register_forward_hook(_record(seen)),
    "module forward pre-hook": lambda m, seen: m.register_forward_pre_hook(_record(seen)),
    "module forward hook with kwargs": lambda m, seen: m.register_forward_hook(_record(seen), with_kwargs=True),
    "global forward hook": lambda m, seen: nn.modules.module.register_module_forward_hook(_record(seen)),
    "global forward pre-hook": lambda m, seen: nn.modules.module.register_module_forward_pre_hook(_record(seen)),
}


@pytest.mark.parametrize("where", ["wrapper", "tuned copy"])
@pytest.mark.parametrize("kind", list(HOOKS))
def test_every_forward_hook_is_honoured(kind, where):
    layer = _layer()
    _call(layer)
    target = layer if where == "wrapper" else layer.tuned_module("default")
    seen: list = []
    handle = HOOKS[kind](target, seen)
    try:
        assert _call(layer)[0] is False
        assert _call(layer)[0] is False  # still there after a call
    finally:
        handle.remove()
    assert sum(module is target for module in seen) == 2
    _call(layer)  # a wrapper hook is gone: the first call after finds out and re-arms
    assert _call(layer)[0] is True


def test_a_hook_dict_written_directly_is_honoured():
    """Not only ``register_forward_hook``: whatever reaches the wrapper's hook dict disarms the direct call."""
    layer = _layer()
    _call(layer)
    seen: list = []
    layer._forward_pre_hooks[0] = _record(seen)
    assert _call(layer)[0] is False
    assert seen == [layer]


@pytest.mark.parametrize("glob", [False, True])
def test_backward_hooks_are_honoured(glob):
    layer = _layer()
    seen = []
    hook = lambda mod, grad_in, grad_out: seen.append(1)  # noqa: E731
    if glob:
        handle = nn.modules.module.register_module_full_backward_hook(hook)
    else:
        handle = layer.tuned_module("default").register_full_backward_hook(hook)
    try:
        direct, out = _call(layer, torch.randn(2, 4, requires_grad=True))
        out.sum().backward()
    finally:
        handle.remove()
    assert not direct and seen


@pytest.mark.parametrize("where", ["wrapper", "tuned copy"])
def test_compiled_calls_take_torchs_path(where):
    layer = _layer()
    target = layer if where == "wrapper" else layer.tuned_module("default")
    calls = []
    target._compiled_call_impl = lambda *a, **k: calls.append(1)
    assert _call(layer)[0] is False and calls == [1]
    target._compiled_call_impl = None
    _call(layer)
    assert _call(layer)[0] is True and calls == [1]


def test_a_replaced_forward_runs():
    """``module.forward = ...`` (a user's, or accelerate's hooks): that forward runs, not the direct call."""
    layer = _layer()
    selected = layer.forward
    layer.forward = lambda x: selected(x) * 0
    direct, out = _call(layer, torch.ones(2, 4))
    assert not direct and out.abs().sum() == 0
    layer.forward = selected  # put back, as accelerate's remove_hook_from_module does
    assert "forward" not in layer._modules  # a bound method: not registered as a submodule
    _call(layer)
    assert _call(layer)[0] is True


def test_a_hooked_forward_follows_set_adapter_and_goes_when_removed():
    """accelerate's ``add_hook_to_module`` keeps the old forward and calls it; ``set_adapter`` must not drop
    the hook, and after ``remove_hook_from_module`` the adapter active then runs (as in PEFT)."""
    layer = LNTuningLayer(nn.LayerNorm(4), "default")
    layer.update_layer("b")
    with torch.no_grad():
        layer.ln_tuning_layers["b"].weight.fill_(3.0)
    calls = []
    layer._old_forward = layer.forward  # what add_hook_to_module does
    layer.forward = functools.partial(lambda module, *args: (calls.append(1), module._old_forward(*args))[1], layer)
    layer.set_adapter("b")
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), layer.ln_tuning_layers["b"](x)) and calls == [1]
    layer.forward = layer._old_forward  # what remove_hook_from_module does
    del layer._old_forward
    layer(x)
    direct, out = _call(layer, x)
    assert direct and torch.equal(out, layer.ln_tuning_layers["b"](x)) and calls == [1]


def test_hooks_added_through_any_reference_are_honoured():
    layer = _layer()
    held = layer._forward_pre_hooks
    _call(layer)
    twin = copy.copy(layer)  # shares the hook dicts, as a shallow copy does
    seen: list = []
    held[0] = _record(seen)
    layer.register_forward_hook(_record(seen))
    assert _call(layer)[0] is False and _call(twin)[0] is False
    assert seen == [layer, layer, twin, twin]


@pytest.mark.parametrize("hook", ["on the tuned copy", "global", "on the wrapper"])
def test_torch_compile_runs_the_hooks(hook):
    layer = _layer()
    net = nn.Sequential(nn.Linear(4, 4), layer)
    if hook == "global":
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    else:
        target = layer if hook == "on the wrapper" else layer.tuned_module("default")
        handle = target.register_forward_hook(lambda module, args, out: out * 2)
    try:
        x = torch.randn(2, 4)
        assert torch.allclose(torch.compile(net, backend="eager")(x), net(x))
    finally:
        handle.remove()
        torch._dynamo.reset()


SEEN: list = []


def _module_level_hook(module, args, output) -> None:  # picklable, unlike a lambda
    SEEN.append(module)


def test_copies_and_pickles_keep_the_hooks():
    layer = _layer()
    layer.register_forward_hook(_module_level_hook)
    SEEN.clear()
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _call(other)[0] is False
        assert SEEN[-1] is other
    assert len(SEEN) == 2


def test_traced_calls_take_torchs_path():
    traced = torch.jit.trace(_layer(), torch.randn(2, 4))
    assert torch.allclose(traced(torch.ones(2, 4)), _layer()(torch.ones(2, 4)))


def test_a_data_parallel_replica_runs_its_own_copy():
    """``torch.nn.parallel.replicate`` copies a module's ``__dict__``, then swaps its children for their
    replicas (simulated here on one device): the replica must run its own copy, not the original's."""
    layer = _layer()
    replica = layer._replicate_for_data_parallel()
    replica._modules["base_layer"] = copy.deepcopy(layer.base_layer)
    copies = layer.ln_tuning_layers._replicate_for_data_parallel()
    copies._modules["default"] = copy.deepcopy(layer.ln_tuning_layers["default"])
    replica._modules["ln_tuning_layers"] = copies
    with torch.no_grad():
        copies["default"].weight.fill_(5.0)
    x = torch.randn(2, 4)
    assert torch.equal(replica(x), copies["default"](x))
    assert _call(replica, x)[0] is True and torch.equal(layer(x), layer.ln_tuning_layers["default"](x))
