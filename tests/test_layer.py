"""LNTuningLayer on its own: copies, forward, merge by swap, gradients, dtype, copying."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lntune import LNTuningLayer

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def tuned_layer(*names: str) -> LNTuningLayer:
    """A frozen LayerNorm(8) wrapped with adapters ``names``, each with distinct non-identity weights."""
    layer = LNTuningLayer(nn.LayerNorm(8).requires_grad_(False), names[0])
    for name in names[1:]:
        layer.update_layer(name)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer.ln_tuning_layers[name].weight.fill_(2.0 + i)
            layer.ln_tuning_layers[name].bias.fill_(0.5 * i)
    return layer


def reference(weight: float, bias: float) -> torch.Tensor:
    return nn.functional.layer_norm(X, (8,)) * weight + bias


def test_identity_at_init_and_independent_copies():
    base = nn.LayerNorm(8)
    layer = LNTuningLayer(base, "a")
    layer.update_layer("b")
    assert layer.base_layer is base
    assert torch.equal(layer(X), base(X))
    copies = [layer.ln_tuning_layers[n] for n in ("a", "b")]
    assert copies[0] is not copies[1] and copies[0].weight is not base.weight
    assert copies[0].weight.data_ptr() != base.weight.data_ptr()
    assert not any(p.requires_grad for p in layer.ln_tuning_layers.parameters())  # frozen until set_adapter
    assert repr(layer).startswith("ln_tuning.LNTuningLayer(")


def test_forward_runs_the_active_copy():
    layer = tuned_layer("a", "b")
    assert torch.allclose(layer(X), reference(2.0, 0.0))
    layer.set_adapter("b")
    assert torch.allclose(layer(X), reference(3.0, 0.5))
    assert layer.active_adapter == "b" and layer.active_adapters == ["b"]


def test_set_adapter_moves_gradients_only_to_the_active_copy():
    layer = tuned_layer("a", "b")
    layer.set_adapter("b")
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["ln_tuning_layers.b.bias", "ln_tuning_layers.b.weight"]
    layer(X).sum().backward()
    assert layer.ln_tuning_layers["b"].weight.grad is not None
    assert layer.ln_tuning_layers["a"].weight.grad is None and layer.base_layer.weight.grad is None
    layer.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in layer.parameters())


def test_set_requires_grad_never_touches_the_original():
    layer = tuned_layer("a", "b")
    layer.set_requires_grad(["a", "b", "missing"], True)
    assert not layer.base_layer.weight.requires_grad
    assert layer.ln_tuning_layers["a"].weight.requires_grad and layer.ln_tuning_layers["b"].weight.requires_grad


def test_layer_without_the_active_adapter_runs_the_original():
    layer = tuned_layer("a")
    layer.set_adapter("elsewhere")
    assert torch.equal(layer(X), layer.base_layer(X))
    layer.set_adapter([])
    assert torch.equal(layer(X), layer.base_layer(X))


def test_two_active_adapters_refused_at_forward():
    layer = tuned_layer("a", "b")
    layer.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="set_adapter"):
        layer(X)


def test_merge_swaps_and_unmerge_restores():
    layer = tuned_layer("a", "b")
    original, tuned = layer.base_layer, layer.ln_tuning_layers["a"]
    before = layer(X)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a"]
    assert layer.base_layer is tuned and layer.ln_tuning_layers["a"] is original
    assert layer.original_module is original and layer.tuned_module("a") is tuned
    assert torch.equal(layer(X), before)
    layer.merge(["b"])  # another adapter: the first is unmerged first
    assert layer.merged_adapters == ["b"] and layer.ln_tuning_layers["a"] is tuned
    assert torch.allclose(layer(X), reference(3.0, 0.5))
    layer.unmerge()
    assert not layer.merged and layer.base_layer is original
    layer.unmerge()  # no-op
    assert layer.base_layer is original


def test_accessors_find_each_adapter_merged_or_not():
    layer = tuned_layer("a", "b")
    original, copy_a, copy_b = layer.base_layer, layer.ln_tuning_layers["a"], layer.ln_tuning_layers["b"]
    names = ["a", "b", "__base__", "missing"]
    for merged in (False, True):
        if merged:  # swaps: base_layer holds a's copy, the slot of "a" holds the original
            layer.merge(["a"])
            assert layer.base_layer is copy_a and layer.ln_tuning_layers["a"] is original
        assert [layer.module_for(n) for n in names] == [copy_a, copy_b, original, original]
        assert [layer.tuned_module(n) for n in ("a", "b")] == [copy_a, copy_b]
        assert layer.original_module is original
        assert [layer.has_adapter(n) for n in names] == [True, True, False, False]
        with pytest.raises(KeyError):
            layer.tuned_module("missing")


def test_merge_of_several_adapters_refused():
    layer = tuned_layer("a", "b")
    with pytest.raises(ValueError, match="one adapter at a time"):
        layer.merge(["a", "b"])
    assert not layer.merged


def test_merge_of_an_adapter_this_layer_lacks_is_a_no_op():
    layer = tuned_layer("a")
    layer.merge(["other"])
    assert not layer.merged


def test_disabled_layer_runs_the_original_even_when_merged():
    layer = tuned_layer("a")
    layer.merge()
    layer.enable_adapters(False)
    assert torch.equal(layer(X), layer.original_module(X))
    assert layer.merged  # disabling does not unmerge
    layer.enable_adapters(True)
    assert torch.allclose(layer(X), reference(2.0, 0.0))


def test_update_layer_while_merged_copies_the_original():
    layer = tuned_layer("a")
    layer.merge()
    layer.update_layer("fresh")
    fresh = layer.ln_tuning_layers["fresh"]
    assert torch.equal(fresh.weight, torch.ones(8)) and torch.equal(fresh.bias, torch.zeros(8))


def test_delete_adapter():
    layer = tuned_layer("a", "b")
    layer.merge()
    with pytest.raises(ValueError, match="while they are merged. Please unmerge them first"):
        layer.delete_adapter("a")
    layer.unmerge()
    layer.delete_adapter("a")
    assert list(layer.ln_tuning_layers) == ["b"] and layer.active_adapters == []
    assert torch.equal(layer(X), layer.base_layer(X))
    layer.delete_adapter("missing")  # no-op


def test_keyword_only_calls_are_forwarded():
    class KwOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, *, hidden_states, factor=1.0):
            return hidden_states * self.scale * factor

    layer = LNTuningLayer(KwOnly(), "a")
    with torch.no_grad():
        layer.ln_tuning_layers["a"].scale.fill_(3.0)
    assert torch.equal(layer(hidden_states=X, factor=2.0), X * 6.0)


def test_in_out_features_exposed():
    assert (LNTuningLayer(nn.Linear(4, 6), "a").in_features, LNTuningLayer(nn.Linear(4, 6), "a").out_features) == (4, 6)
    norm_layer = LNTuningLayer(nn.LayerNorm(4), "a")
    assert norm_layer.in_features is None and norm_layer.out_features is None


def test_follows_train_and_eval_mode():
    layer = LNTuningLayer(nn.LayerNorm(8).eval(), "a")
    assert not any(m.training for m in layer.modules())
    layer.train()
    assert all(m.training for m in layer.modules())


def test_deepcopy_and_pickle_keep_state_and_forward():
    layer = tuned_layer("a", "b")
    layer.set_adapter("b")
    layer.merge()
    expected = layer(X)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.merged_adapters == ["b"] and clone.active_adapters == ["b"]
        assert torch.equal(clone(X), expected)
        clone.unmerge()
        with torch.no_grad():
            clone.ln_tuning_layers["b"].weight.fill_(7.0)
        assert torch.allclose(clone(X), reference(7.0, 0.5))
        assert torch.equal(layer(X), expected)  # the original is unaffected


@pytest.mark.parametrize("merged", [False, True])
def test_hooks_on_the_wrapper_the_running_copy_and_global_all_fire(merged):
    layer = tuned_layer("a", "b")
    if merged:
        layer.merge()
    running = layer.module_for("a")
    expected = layer(X)
    seen = []

    def pre_hook(module, args):
        seen.append(("pre", module))

    def doubling_hook(module, args, output):
        seen.append(("post", module))
        return output * 2

    for module in (layer, running):
        handles = [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(doubling_hook)]
        assert torch.equal(layer(X), expected * 2)
        assert seen == [("pre", module), ("post", module)]
        for handle in handles:
            handle.remove()
        seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(doubling_hook)
    try:
        out = layer(X)
    finally:
        handle.remove()
    assert torch.equal(out, expected * 4)  # the wrapper's call and the copy's call each doubled it
    assert [m for _, m in seen] == [running, layer]
    assert torch.equal(layer(X), expected)  # no hook left: the direct path again


def test_backward_hooks_and_tracing_take_nn_modules_path():
    layer = tuned_layer("a")
    layer.set_adapter("a")
    grads = []
    handle = layer.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0]))
    layer(X.requires_grad_(True)).sum().backward()
    handle.remove()
    X.requires_grad_(False)
    assert len(grads) == 1 and torch.equal(grads[0], torch.ones_like(X))
    traced = torch.jit.trace(layer, X)
    assert torch.equal(traced(X), layer(X))


def test_a_module_with_its_own_call_is_called_through_it():
    class Counting(nn.LayerNorm):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return super().__call__(*args, **kwargs)

    layer = LNTuningLayer(Counting(8), "a")
    layer.set_adapter("a")
    assert torch.equal(layer(X), layer.base_layer(X)) and Counting.calls == 2  # the copy's call and the base's
