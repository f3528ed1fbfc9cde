"""The wrappers' direct forward call against torch's own ``nn.Module.__call__``: fails loudly when torch changes.

`lntune.fast_call` lets a wrapper call the chosen module's ``forward`` directly when torch's ``__call__``
would do nothing else. These tests read torch's source for what ``__call__`` checks, so that a torch
release that adds a hook kind (or another reason not to call ``forward`` straight away) fails here
instead of silently skipping that hook; and they check that every kind of hook is still honoured.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

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


def _layer() -> LNTuningLayer:
    layer = LNTuningLayer(nn.LayerNorm(4), "default")
    layer.set_adapter("default")
    return layer


def test_no_hook_calls_forward_directly():
    layer = _layer()
    assert fast_call.direct_call_allowed(layer, layer._direct)


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
    target = layer if where == "wrapper" else layer.tuned_module("default")
    seen: list = []
    handle = HOOKS[kind](target, seen)
    try:
        assert not fast_call.direct_call_allowed(layer, layer._direct)
        layer(torch.randn(2, 4))
    finally:
        handle.remove()
    assert any(module is target for module in seen)
    assert fast_call.direct_call_allowed(layer, layer._direct)


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
        assert not fast_call.direct_call_allowed(layer, layer._direct)
        layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    finally:
        handle.remove()
    assert seen


def test_compiled_and_traced_calls_take_torchs_path():
    layer = _layer()
    layer.tuned_module("default")._compiled_call_impl = lambda *a, **k: None
    assert not fast_call.direct_call_allowed(layer, layer._direct)
    layer.tuned_module("default")._compiled_call_impl = None
    traced = torch.jit.trace(_layer(), torch.randn(2, 4))
    assert torch.allclose(traced(torch.ones(2, 4)), _layer()(torch.ones(2, 4)))
