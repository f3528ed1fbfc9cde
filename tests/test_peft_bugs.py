"""One test (or a few) per PEFT LN tuning bug that lntune must not have (reference doc §4-§5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output, sgd_steps, trainable_names
from torch import nn

from lntune import LNTuningConfig, LNTuningLayer, PeftModel, get_peft_model, get_peft_model_state_dict
from lntune.modules_to_save import ModulesToSaveWrapper

LLAMA_X = make_inputs("llama")


def lntune_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("lntune.")]


def original_params(model: nn.Module) -> list[nn.Parameter]:
    """The pretrained parameters of every wrapped module, wherever a merge put them."""
    return [
        p
        for m in model.modules()
        if isinstance(m, (LNTuningLayer, ModulesToSaveWrapper))
        for p in m.original_module.parameters()
    ]


def disjoint_llama(perturb) -> PeftModel:
    """'default' tunes model.norm, 'other' the input norms (and lm_head in full): no layer has both."""
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(target_modules=["norm"]))
    perturb(model, seed=0)
    model.add_adapter("other", LNTuningConfig(target_modules=["input_layernorm"], modules_to_save=["lm_head"]))
    model.set_adapter("other")
    perturb(model, seed=1)
    model.set_adapter("default")
    return model


def expected_output(perturb, adapter: str) -> torch.Tensor:
    """Output of a model that has only ``adapter`` (same seeded weights as `disjoint_llama`)."""
    targets, to_save = {"default": (["norm"], None), "other": (["input_layernorm"], ["lm_head"])}[adapter]
    config = LNTuningConfig(target_modules=targets, modules_to_save=to_save)
    model = get_peft_model(make_tiny_model("llama"), config)
    perturb(model, seed=0 if adapter == "default" else 1)
    return model_output(model, LLAMA_X).detach()


# ---------------------------------------------------------------------- E1: disjoint targets
@pytest.mark.parametrize("adapter", ["default", "other"])
def test_e1_disjoint_targets_forward_merge_unload(perturb, adapter):
    # PEFT: KeyError in forward, merge_adapter and merge_and_unload.
    model = disjoint_llama(perturb)
    model.set_adapter(adapter)
    expected = expected_output(perturb, adapter)
    assert not torch.allclose(expected, model_output(make_tiny_model("llama"), LLAMA_X))
    assert torch.equal(model_output(model, LLAMA_X), expected)
    model.merge_adapter()
    assert torch.equal(model_output(model, LLAMA_X), expected)
    model.unmerge_adapter()
    assert torch.equal(model_output(copy.deepcopy(model).merge_and_unload(), LLAMA_X), expected)
    other = "other" if adapter == "default" else "default"
    plain = copy.deepcopy(model).merge_and_unload(adapter_names=[other])  # merging the inactive one works too
    assert torch.equal(model_output(plain, LLAMA_X), expected_output(perturb, other))
    assert torch.equal(model_output(model.unload(), LLAMA_X), model_output(make_tiny_model("llama"), LLAMA_X))


def test_e1_layer_without_the_active_adapter_runs_its_base_module(perturb):
    model = disjoint_llama(perturb)
    layer = model.get_base_model().model.layers[0].input_layernorm
    assert list(layer.ln_tuning_layers) == ["other"] and layer.active_adapter == "default"
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert not torch.equal(layer(x), layer.ln_tuning_layers["other"](x))


# -------------------------------------------------------------------- E2: save while merged
def test_e2_state_dict_and_save_while_merged_are_the_tuned_weights(perturb, tmp_path):
    # PEFT: saves the pretrained weights (the swap put them in the adapter's slot).
    model = disjoint_llama(perturb)
    tuned = model_output(model, LLAMA_X).detach()
    before = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    model.merge_adapter()
    merged = get_peft_model_state_dict(model)
    assert merged.keys() == before.keys() and all(torch.equal(merged[k], before[k]) for k in before)
    assert not torch.equal(before["base_model.model.model.norm.ln_tuning_layers.weight"], torch.ones(16))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert torch.equal(model_output(reloaded, LLAMA_X), tuned)


# -------------------------------------------------------------- E3: grads leak while merged
@pytest.mark.parametrize("call", ["enable_adapter_layers", "set_requires_grad", "disable_then_enable"])
def test_e3_base_weights_never_become_trainable_while_merged(perturb, call):
    model = disjoint_llama(perturb)
    adapter_names = trainable_names(model)
    model.merge_adapter()
    if call == "enable_adapter_layers":
        model.enable_adapter_layers()
    elif call == "set_requires_grad":
        model.set_requires_grad(["default", "other"], True)
        model.set_requires_grad("other", False)
    else:
        model.disable_adapter_layers()
        model.enable_adapter_layers()
    assert not any(p.requires_grad for p in original_params(model))
    tuned_norm = model.get_base_model().model.norm.tuned_module("default")
    assert all(p.requires_grad for p in tuned_norm.parameters())
    model.unmerge_adapter()
    assert trainable_names(model) == adapter_names
    before = [p.detach().clone() for p in original_params(model)]
    sgd_steps(model, LLAMA_X, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, original_params(model)))


def test_e3_training_while_merged_updates_the_adapter_not_the_base(perturb):
    model = disjoint_llama(perturb)
    model.merge_adapter()
    sgd_steps(model, LLAMA_X, steps=2)
    trained = model_output(model, LLAMA_X).detach()
    model.unmerge_adapter()
    assert torch.equal(model_output(model, LLAMA_X), trained)
    norm = model.get_base_model().model.norm
    assert torch.equal(norm.base_layer.weight, torch.ones(16))


# --------------------------------------------------------------- E4: add_adapter while merged
def test_e4_add_adapter_while_merged_starts_from_pretrained(perturb):
    # PEFT: deep-copies the swapped-in tuned module.
    model = disjoint_llama(perturb)
    model.merge_adapter()
    model.add_adapter("fresh", LNTuningConfig(target_modules=["norm", "input_layernorm"]))
    norm = model.get_base_model().model.norm
    assert torch.equal(norm.ln_tuning_layers["fresh"].weight, torch.ones(16))
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        model.set_adapter("fresh")
    assert torch.equal(model_output(model, LLAMA_X), model_output(make_tiny_model("llama"), LLAMA_X))


# ------------------------------------------------------- E5: wrappers left after unloading
@pytest.mark.parametrize("merge", [True, False])
def test_e5_unload_leaves_no_wrapper_modules_to_save_included(perturb, merge):
    # PEFT: ModulesToSaveWrapper survives unload() and merge_and_unload().
    base = make_tiny_model("bert")
    inputs = make_inputs("bert")
    base_out = model_output(base, inputs).detach()
    original_head = base.classifier
    model = get_peft_model(base, LNTuningConfig(task_type="SEQ_CLS"))
    perturb(model)
    trained_head = model.get_base_model().classifier.modules_to_save["default"]
    tuned = model_output(model, inputs).detach()
    plain = model.merge_and_unload() if merge else model.unload()
    assert lntune_modules(plain) == []
    assert plain.classifier is (trained_head if merge else original_head)
    assert torch.equal(model_output(plain, inputs), tuned if merge else base_out)


# ------------------------------------------------------------ E7: keyword-only targets
@pytest.mark.parametrize("kind", ["llama", "qwen2", "bart"])
def test_e7_targets_called_with_keywords_only_run(kind, perturb):
    # PEFT: TypeError "missing 1 required positional argument: 'x'" for attention blocks.
    inputs = make_inputs(kind)
    base_out = model_output(make_tiny_model(kind), inputs).detach()
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig(target_modules=["self_attn"]))
    assert torch.equal(model_output(model, inputs), base_out)
    perturb(model, scale=0.05)
    tuned = model_output(model, inputs).detach()
    assert not torch.allclose(tuned, base_out)
    model.merge_adapter()
    assert torch.equal(model_output(model, inputs), tuned)
    model.unmerge_adapter()
    losses = sgd_steps(model, inputs, steps=2, lr=0.1)
    assert losses[1] != losses[0]


# --------------------------------------------------- E9: inference_mode of another adapter
def test_e9_adding_an_inference_mode_adapter_keeps_the_others_trainable(perturb):
    model = disjoint_llama(perturb)
    trainable = trainable_names(model)
    model.add_adapter("frozen", LNTuningConfig(target_modules=["norm"], inference_mode=True))
    assert trainable_names(model) == trainable
    model.set_adapter("frozen")
    assert trainable_names(model) == set()
    model.set_adapter("default")
    assert trainable_names(model) == trainable


def test_e9_load_adapter_frozen_keeps_the_active_one_trainable(perturb, tmp_path):
    model = disjoint_llama(perturb)
    model.save_pretrained(tmp_path)
    trainable = trainable_names(model)
    model.load_adapter(tmp_path / "other", adapter_name="loaded")
    assert trainable_names(model) == trainable


# ------------------------------------------------ no per-layer warnings; disable keeps merge
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_no_warning_per_wrapped_layer(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_peft_model(make_tiny_model(kind), LNTuningConfig())
        model.add_adapter("other", LNTuningConfig())
        model.set_adapter("other")
        model.delete_adapter("default")


def test_disable_adapter_restores_a_merged_model_to_merged(perturb):
    # PEFT: the context unmerges and leaves the model unmerged.
    model = disjoint_llama(perturb)
    model.merge_adapter()
    tuned = model_output(model, LLAMA_X).detach()
    merged_bases = [m.base_layer for m in model.modules() if isinstance(m, LNTuningLayer)]
    with model.disable_adapter():
        assert torch.equal(model_output(model, LLAMA_X), model_output(make_tiny_model("llama"), LLAMA_X))
    assert model.base_model.merged
    assert [m.base_layer for m in model.modules() if isinstance(m, LNTuningLayer)] == merged_bases
    assert torch.equal(model_output(model, LLAMA_X), tuned)
