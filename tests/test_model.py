"""PeftModel / LNTuningModel API: adapters, merge, disable, unload, counts, copies, messages.

The last section ports PEFT's own LN tuning checks on its five ``MLP_LayerNorm`` rows.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output, sgd_steps, trainable_names
from torch import nn

import lntune
from lntune import (
    LNTuningConfig,
    LNTuningLayer,
    LNTuningModel,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from lntune.modules_to_save import ModulesToSaveWrapper

LLAMA_X = make_inputs("llama")
MLP_X = make_inputs("mlp")


def lntune_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LNTuningLayer, ModulesToSaveWrapper))]


def llama_with_two_adapters(perturb):
    """Tiny llama with trained-looking adapters 'default' and 'other' (both on the default norms)."""
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type="CAUSAL_LM"))
    perturb(model, seed=0)
    model.add_adapter("other", LNTuningConfig(task_type="CAUSAL_LM"))
    model.set_adapter("other")
    perturb(model, seed=1)
    model.set_adapter("default")
    return model


# ------------------------------------------------------------------------------ public API
def test_public_names():
    for name in [
        "LNTuningConfig",
        "LNTuningModel",
        "LNTuningLayer",
        "get_peft_model",
        "PeftModel",
        "TaskType",
        "inject_adapter_in_model",
        "get_peft_model_state_dict",
        "set_peft_model_state_dict",
    ]:
        assert name in lntune.__all__ and getattr(lntune, name) is not None
    kinds = {
        "CAUSAL_LM": lntune.PeftModelForCausalLM,
        "SEQ_CLS": lntune.PeftModelForSequenceClassification,
        "SEQ_2_SEQ_LM": lntune.PeftModelForSeq2SeqLM,
        "TOKEN_CLS": lntune.PeftModelForTokenClassification,
        "QUESTION_ANS": lntune.PeftModelForQuestionAnswering,
        "FEATURE_EXTRACTION": lntune.PeftModelForFeatureExtraction,
    }
    for task, cls in kinds.items():
        assert issubclass(cls, PeftModel)
        assert lntune.peft_model.MODEL_TYPE_TO_PEFT_MODEL[TaskType(task)] is cls


def test_tuner_seed():
    assert LNTuningModel.prefix == "ln_tuning_"
    assert LNTuningModel.tuner_layer_cls is LNTuningLayer
    assert LNTuningModel.target_module_mapping is lntune.TARGET_MODULES_BY_MODEL_TYPE
    for method in ("_create_and_replace", "_create_new_module", "_unloading_checks", "_cast_adapter_dtype"):
        assert callable(getattr(LNTuningModel, method))
    params = list(inspect.signature(LNTuningModel._unload_and_optionally_merge).parameters)
    assert params == ["self", "merge", "progressbar", "safe_merge", "adapter_names"]


def test_get_peft_model_basics(capsys):
    base = make_tiny_model("llama")
    expected = model_output(base, LLAMA_X).detach()
    model = get_peft_model(base, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    assert type(model) is lntune.PeftModelForCausalLM and isinstance(model.base_model, LNTuningModel)
    assert model.get_base_model() is base
    assert list(model.peft_config) == ["default"] and model.peft_type == "LN_TUNING"
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert model.modules_to_save is None
    assert torch.equal(model_output(model, LLAMA_X), expected)
    # PEFT's numbers for the same tiny llama: "all" counts the copies too.
    assert model.get_nb_trainable_parameters() == (80, 6816)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 80 || all params: 6,816 || trainable%: 1.1737\n"
    assert model.config is base.config  # attribute fall-through to the base model


@pytest.mark.parametrize(
    ("task", "auto_class", "head"),
    [
        ("SEQ_CLS", "AutoModelForSequenceClassification", "classifier"),
        ("TOKEN_CLS", "AutoModelForTokenClassification", "classifier"),
        ("QUESTION_ANS", "AutoModelForQuestionAnswering", "qa_outputs"),
        ("FEATURE_EXTRACTION", "AutoModel", None),
    ],
)
def test_task_variants_train_their_head(task, auto_class, head):
    import transformers

    config = copy.deepcopy(make_tiny_model("bert").config)
    config.num_labels = 2
    torch.manual_seed(0)
    base = getattr(transformers, auto_class).from_config(config).eval()
    model = get_peft_model(base, LNTuningConfig(task_type=task))
    assert type(model) is lntune.peft_model.MODEL_TYPE_TO_PEFT_MODEL[TaskType(task)]
    inputs = make_inputs("bert")
    labels = {
        "SEQ_CLS": {"labels": torch.tensor([0, 1])},
        "TOKEN_CLS": {"labels": torch.zeros(2, 8, dtype=torch.long)},
        "QUESTION_ANS": {"start_positions": torch.tensor([0, 1]), "end_positions": torch.tensor([2, 3])},
        "FEATURE_EXTRACTION": {},
    }[task]
    out = model(**inputs, **labels)
    loss = out.loss if head else out.last_hidden_state.square().mean()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable_names(model)
    if head:
        assert f"base_model.model.{head}.modules_to_save.default.weight" in with_grad
    else:
        assert model.modules_to_save is None


def test_get_peft_model_refuses_other_configs_and_mixed():
    with pytest.raises(TypeError, match="LNTuningConfig"):
        get_peft_model(make_tiny_model("mlp"), {"target_modules": ["lin0"]})
    with pytest.raises(ValueError, match="mixed=False"):
        get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=["lin0"]), mixed=True)


def test_only_active_adapter_copies_are_trainable(perturb):
    model = llama_with_two_adapters(perturb)
    names = trainable_names(model)
    assert len(names) == 5 and all(".ln_tuning_layers.default." in n for n in names)
    model.set_adapter("other")
    assert {n.replace(".other.", ".default.") for n in trainable_names(model)} == names
    model.set_adapter("other", inference_mode=True)
    assert trainable_names(model) == set()


def test_add_set_delete_adapter(perturb):
    base_out = model_output(make_tiny_model("llama"), LLAMA_X).detach()
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type="CAUSAL_LM"))
    perturb(model)
    default_out = model_output(model, LLAMA_X).detach()
    model.add_adapter("other", LNTuningConfig(task_type="CAUSAL_LM"))
    assert model.active_adapter == "default" and torch.equal(model_output(model, LLAMA_X), default_out)
    model.set_adapter("other")
    assert torch.equal(model_output(model, LLAMA_X), base_out)  # a new adapter starts as identity
    model.set_adapter("default")
    with pytest.warns(UserWarning, match="Setting active adapter to other") as record:
        model.delete_adapter("default")
    assert len(record) == 1  # once, not once per layer as in PEFT
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    layers = [m for m in model.modules() if isinstance(m, LNTuningLayer)]
    assert all(list(layer.ln_tuning_layers) == ["other"] for layer in layers)
    assert torch.equal(model_output(model, LLAMA_X), base_out)


def test_delete_inactive_adapter_keeps_state(perturb):
    model = llama_with_two_adapters(perturb)
    model.merge_adapter()
    model.set_requires_grad("default", False)
    merged_out = model_output(model, LLAMA_X).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.delete_adapter("other")
    assert model.base_model.merged and trainable_names(model) == set()
    assert torch.equal(model_output(model, LLAMA_X), merged_out)


def test_deleting_the_last_adapter_leaves_a_working_base_model(perturb):
    # PEFT: PeftModel.forward then raises KeyError('default').
    base_out = model_output(make_tiny_model("bert"), make_inputs("bert")).detach()
    model = get_peft_model(make_tiny_model("bert"), LNTuningConfig(task_type="SEQ_CLS"))
    perturb(model)
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == [] and lntune_modules(model) == []
    assert torch.equal(model_output(model, make_inputs("bert")), base_out)
    assert trainable_names(model) == set()
    model.add_adapter("again", LNTuningConfig(task_type="SEQ_CLS"))  # and adapters can be added again
    model.set_adapter("again")
    assert trainable_names(model) and torch.equal(model_output(model, make_inputs("bert")), base_out)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.set_adapter("nope"), r"Adapter nope not found\. Existing adapters: \['default', 'other'\]"),
        (lambda m: m.delete_adapter("nope"), r"Adapter nope does not exist\. Existing adapters"),
        (lambda m: m.set_requires_grad("nope"), r"Adapter nope not found"),
        (lambda m: m.merge_adapter(["nope"]), r"Adapter nope not found"),
        (lambda m: m.add_adapter("other", LNTuningConfig()), r"'other' already exists; choose another name"),
        (lambda m: m.add_adapter("a.b", LNTuningConfig()), r"Invalid adapter name 'a\.b'.*without '\.'"),
        (lambda m: m.add_adapter("", LNTuningConfig()), r"Invalid adapter name ''"),
        (lambda m: m.add_adapter("__base__", LNTuningConfig()), r"Invalid adapter name '__base__'"),
        (lambda m: m.merge_adapter(["default", "other"]), r"merging more than one adapter.*adapter_names=\[name\]"),
        (lambda m: m.merge_and_unload(adapter_names=["default", "other"]), r"more than one adapter"),
    ],
)
def test_misuse_messages_say_what_to_do(perturb, call, message):
    model = llama_with_two_adapters(perturb)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    assert list(model.peft_config) == ["default", "other"] and not model.base_model.merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deleting_a_merged_adapter_says_unmerge_first(perturb):
    model = llama_with_two_adapters(perturb)
    model.merge_adapter()
    out = model_output(model, LLAMA_X).detach()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged.*unmerge"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default", "other"] and model.base_model.merged
    assert torch.equal(model_output(model, LLAMA_X), out)
    model.delete_adapter("other")  # the unmerged one can go


def test_forward_with_two_active_adapters_says_what_to_do(perturb):
    model = llama_with_two_adapters(perturb)
    with pytest.raises(TypeError, match="one adapter name"):
        model.set_adapter(["default", "other"])
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    with pytest.raises(ValueError, match=r"set_adapter\(name\)"):
        model(**LLAMA_X)


def test_merge_unmerge_merge_and_unload_unload(perturb):
    model = llama_with_two_adapters(perturb)
    base_out = model_output(make_tiny_model("llama"), LLAMA_X).detach()
    tuned = model_output(model, LLAMA_X).detach()
    assert not torch.allclose(tuned, base_out)
    model.merge_adapter()
    assert model.base_model.merged and torch.equal(model_output(model, LLAMA_X), tuned)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    assert not model.base_model.merged and torch.equal(model_output(model, LLAMA_X), tuned)
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    model.merge_adapter(safe_merge=True)
    merged_plain = copy.deepcopy(model).merge_and_unload(progressbar=True)
    assert lntune_modules(merged_plain) == [] and not hasattr(merged_plain, "peft_config")
    assert torch.equal(model_output(merged_plain, LLAMA_X), tuned)
    other_plain = copy.deepcopy(model).merge_and_unload(adapter_names=["other"])
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        model.set_adapter("other")
    assert torch.equal(model_output(other_plain, LLAMA_X), model_output(model, LLAMA_X))
    plain = model.unload()
    assert lntune_modules(plain) == [] and torch.equal(model_output(plain, LLAMA_X), base_out)


def test_merging_another_adapter_unmerges_the_first(perturb):
    model = llama_with_two_adapters(perturb)
    model.set_adapter("other")
    other_out = model_output(model, LLAMA_X).detach()
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"Already merged with \['default'\]\. Unmerging first"):
        model.merge_adapter(["other"])
    assert torch.equal(model_output(model, LLAMA_X), other_out)


def test_set_adapter_while_merged_unmerges_with_one_warning(perturb):
    model = llama_with_two_adapters(perturb)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging the model first") as record:
        model.set_adapter("other")
    assert len(record) == 1 and not model.base_model.merged


def test_disable_adapter_context_and_layers(perturb):
    model = llama_with_two_adapters(perturb)
    base_out = model_output(make_tiny_model("llama"), LLAMA_X).detach()
    tuned = model_output(model, LLAMA_X).detach()
    names = trainable_names(model)
    with model.disable_adapter():
        assert torch.equal(model_output(model, LLAMA_X), base_out) and trainable_names(model) == set()
    assert torch.equal(model_output(model, LLAMA_X), tuned) and trainable_names(model) == names
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(model_output(model, LLAMA_X), tuned) and trainable_names(model) == names
    model.disable_adapter_layers()
    assert torch.equal(model_output(model, LLAMA_X), base_out) and trainable_names(model) == set()
    model.enable_adapter_layers()
    assert torch.equal(model_output(model, LLAMA_X), tuned) and trainable_names(model) == names


@pytest.mark.parametrize("again", ["get_peft_model", "wrap_peft_model", "inject_adapter_in_model"])
def test_second_wrapping_with_an_existing_adapter_name_refused(perturb, again):
    # PEFT re-initialises the existing adapter's copies in place (with a warning): trained weights are lost.
    base = make_tiny_model("llama")
    model = get_peft_model(base, LNTuningConfig(target_modules=["norm"]))
    perturb(model)
    out = model_output(model, LLAMA_X).detach()
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        if again == "get_peft_model":
            get_peft_model(base, LNTuningConfig(target_modules=["norm"]))
        elif again == "wrap_peft_model":
            get_peft_model(model, LNTuningConfig(target_modules=["norm"]))
        else:
            inject_adapter_in_model(LNTuningConfig(target_modules=["norm"]), base)
    assert torch.equal(model_output(model, LLAMA_X), out)
    inject_adapter_in_model(LNTuningConfig(target_modules=["norm"]), base, adapter_name="low_level")  # a new name


def test_two_active_adapters_sharing_a_module_to_save_refused_without_change(perturb):
    model = get_peft_model(
        make_tiny_model("llama"), LNTuningConfig(target_modules=["norm"], modules_to_save=["lm_head"])
    )
    model.add_adapter("other", LNTuningConfig(target_modules=["norm"], modules_to_save=["lm_head"]))
    perturb(model)
    out, names = model_output(model, LLAMA_X).detach(), trainable_names(model)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"] and trainable_names(model) == names
    assert all(m.active_adapters == ["default"] for m in model.modules() if isinstance(m, LNTuningLayer))
    assert torch.equal(model_output(model, LLAMA_X), out)


def test_module_to_save_of_another_adapter_waits_for_set_adapter():
    # PEFT's test_set_adapter_non_overlapping_modules_to_save.
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(target_modules=["norm"]))
    model.add_adapter("other", LNTuningConfig(target_modules=["norm"], modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert head.active_adapters == [] and not any(p.requires_grad for p in head.parameters())  # as in PEFT
    assert torch.equal(head(torch.ones(1, 16)), head.original_module(torch.ones(1, 16)))
    model.set_adapter("other")
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"modules_to_save.other.weight"}


def test_set_adapter_inside_disable_context_is_the_trainable_one_after(perturb):
    model = llama_with_two_adapters(perturb)
    with model.disable_adapter():
        model.set_adapter("other")
    assert model.active_adapter == "other"
    names = trainable_names(model)
    assert len(names) == 5 and all(".ln_tuning_layers.other." in n for n in names)


@pytest.mark.parametrize("disable", ["context", "layers"])
def test_adapter_added_while_disabled_stays_disabled(perturb, disable):
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(target_modules=["norm"]))
    base_out = model_output(make_tiny_model("llama"), LLAMA_X).detach()

    def add_and_check():
        model.add_adapter("new", LNTuningConfig(target_modules=["input_layernorm"], modules_to_save=["lm_head"]))
        model.set_adapter("new")
        perturb(model, seed=3)
        assert torch.equal(model_output(model, LLAMA_X), base_out)

    if disable == "context":
        with model.disable_adapter():
            add_and_check()
    else:
        model.disable_adapter_layers()
        add_and_check()
        model.enable_adapter_layers()
    assert not torch.equal(model_output(model, LLAMA_X), base_out)  # enabled again: the new adapter runs


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"target_modules": ["down_proj"]}, {"target_modules": ["mlp"]}),
        ({"target_modules": ["down_proj"]}, {"target_modules": ["norm"], "modules_to_save": ["mlp"]}),
        ({"target_modules": ["norm"], "modules_to_save": ["down_proj"]}, {"target_modules": ["mlp"]}),
        ({"target_modules": ["norm"], "modules_to_save": ["lm_head"]}, {"target_modules": "lm_head|model"}),
    ],
)
def test_new_target_containing_a_wrapped_module_is_refused_before_any_change(perturb, first, second):
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(**first))
    perturb(model)
    out = model_output(model, LLAMA_X).detach()
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="does not nest adapters"):
        model.add_adapter("outer", LNTuningConfig(**second))
    assert [n for n, _ in model.named_modules()] == modules and list(model.peft_config) == ["default"]
    assert torch.equal(model_output(model, LLAMA_X), out)


def test_target_containing_its_own_module_to_save_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="does not nest adapters"):
        get_peft_model(model, LNTuningConfig(target_modules=["mlp"], modules_to_save=["down_proj"]))
    assert lntune_modules(model) == []


def test_set_requires_grad(perturb):
    model = llama_with_two_adapters(perturb)
    model.set_requires_grad("other")
    assert {n.split(".ln_tuning_layers.")[1].split(".")[0] for n in trainable_names(model)} == {"default", "other"}
    model.set_requires_grad(["default", "other"], False)
    assert trainable_names(model) == set()


def test_generate_follows_the_adapter(perturb):
    model = llama_with_two_adapters(perturb)
    prompt = LLAMA_X["input_ids"][:1]
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    tuned = model.generate(input_ids=prompt, **kwargs)
    assert tuned.shape == (1, prompt.shape[1] + 4)
    plain = copy.deepcopy(model).merge_and_unload()
    assert torch.equal(plain.generate(input_ids=prompt, **kwargs), tuned)
    base_tokens = make_tiny_model("llama").generate(input_ids=prompt, **kwargs)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=prompt, **kwargs), base_tokens)


def test_train_and_eval_reach_every_module(perturb):
    model = llama_with_two_adapters(perturb)
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("merged", [False, True])
def test_deepcopy_and_pickle(perturb, merged):
    model = llama_with_two_adapters(perturb)
    if merged:
        model.merge_adapter()
    tuned = model_output(model, LLAMA_X).detach()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.base_model.merged is merged and clone.active_adapter == "default"
        assert torch.equal(model_output(clone, LLAMA_X), tuned)
        assert trainable_names(clone) == trainable_names(model)
        if merged:
            clone.unmerge_adapter()
        clone.set_adapter("other")
        perturb(clone, seed=5)
        assert torch.equal(model_output(model, LLAMA_X), tuned)  # the original is independent


def test_modules_to_save_property_and_head_copy():
    model = get_peft_model(make_tiny_model("bert"), LNTuningConfig(task_type="SEQ_CLS"))
    assert model.modules_to_save == {"classifier", "score"}
    head = model.get_base_model().classifier
    assert isinstance(head, ModulesToSaveWrapper) and not head.original_module.weight.requires_grad
    assert head.modules_to_save["default"].weight.requires_grad


def test_inject_adapter_in_model_and_state_dict_functions(perturb):
    model = inject_adapter_in_model(LNTuningConfig(target_modules=["norm"]), make_tiny_model("llama"))
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model.model.norm, LNTuningLayer)
    perturb(model)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    assert list(state) == ["model.norm.ln_tuning_layers.weight"]
    fresh = inject_adapter_in_model(LNTuningConfig(target_modules=["norm"]), make_tiny_model("llama"))
    set_peft_model_state_dict(fresh, state)
    assert torch.equal(model_output(fresh, LLAMA_X), model_output(model, LLAMA_X))


def test_load_adapter_under_an_existing_name_raises(tmp_path, perturb):
    # PEFT silently overwrites the existing adapter's weights.
    model = llama_with_two_adapters(perturb)
    model.save_pretrained(tmp_path)
    out = model_output(model, LLAMA_X).detach()
    with pytest.raises(ValueError, match="'other' already exists.*delete_adapter"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert torch.equal(model_output(model, LLAMA_X), out)


# ------------------------------------------------- PEFT's own LN tuning tests (MLP_LayerNorm)
MLP_ROWS = {
    "LayerNorm 1 LNTuning": {"target_modules": "layernorm0"},
    "LayerNorm 2 LNTuning": {"target_modules": ["layernorm0"]},
    "LayerNorm 3 LNTuning": {"target_modules": ["layernorm0"], "modules_to_save": ["layernorm1"]},
    "Linear 4 LNTuning": {"target_modules": "lin0"},
    "Linear 5 LNTuning": {"target_modules": ["lin0"]},
}


@pytest.fixture(params=list(MLP_ROWS), ids=list(MLP_ROWS))
def mlp_row(request):
    """The `LNTuningConfig` kwargs of one row; `mlp_model(kwargs)` builds a fresh wrapped MLP."""
    return MLP_ROWS[request.param]


def mlp_model(kwargs: dict, adapter_name: str = "default") -> PeftModel:
    return get_peft_model(make_tiny_model("mlp"), LNTuningConfig(**kwargs), adapter_name=adapter_name)


def test_mlp_identity_at_init_and_finite(mlp_row):
    model = mlp_model(mlp_row, adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())
    out = model(**MLP_X)
    assert torch.isfinite(out).all() and torch.equal(out, make_tiny_model("mlp")(**MLP_X))
    for layer in model.modules():
        if isinstance(layer, LNTuningLayer):
            assert hasattr(layer, "in_features") and hasattr(layer, "out_features")


def test_mlp_training_touches_only_trainable_params(mlp_row):
    model = mlp_model(mlp_row)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    trainable = trainable_names(model)
    assert trainable and all("ln_tuning_" in n or "modules_to_save" in n for n in trainable)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model_output(model, MLP_X).square().mean()
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.allclose(before[k], after[k], atol=1e-4)}
    assert changed == trainable


def test_mlp_merge_unmerge_merge_and_unload(mlp_row, perturb):
    model = mlp_model(mlp_row)
    perturb(model)
    tuned = model(**MLP_X).detach()
    model.merge_adapter()
    assert torch.allclose(model(**MLP_X), tuned, atol=1e-6)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    assert torch.allclose(model(**MLP_X), tuned, atol=1e-6)
    plain = model.merge_and_unload(safe_merge=True)
    assert lntune_modules(plain) == [] and torch.allclose(plain(**MLP_X), tuned, atol=1e-6)
    assert torch.allclose(pickle.loads(pickle.dumps(plain))(**MLP_X), tuned, atol=1e-6)


@pytest.mark.parametrize("merge", [False, True])
def test_mlp_disable_adapters_after_training(mlp_row, merge):
    model = mlp_model(mlp_row)
    before = model(**MLP_X).detach()
    sgd_steps(model, MLP_X, steps=3, lr=0.5)
    trained = model(**MLP_X).detach()
    assert not torch.allclose(trained, before)
    if merge:
        model.merge_adapter()
        assert torch.allclose(model(**MLP_X), trained, atol=1e-6)
    with model.disable_adapter():
        assert torch.allclose(model(**MLP_X), before, atol=1e-8, rtol=1e-8)
        assert all(m.disable_adapters for m in model.modules() if isinstance(m, LNTuningLayer))
    assert torch.allclose(model(**MLP_X), trained, atol=1e-6)
    assert model.base_model.merged is merge
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LNTuningLayer))


def test_mlp_disable_context_keeps_disabled_layers_disabled(mlp_row):
    model = mlp_model(mlp_row)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in model.modules() if isinstance(m, (LNTuningLayer, ModulesToSaveWrapper)))


def test_mlp_active_adapter_and_delete(mlp_row):
    model = mlp_model(mlp_row)
    model.add_adapter("other", LNTuningConfig(**mlp_row))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    model.set_adapter("other")
    assert model.active_adapter == "other"
    model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    for module in model.modules():
        for copies in (getattr(module, "ln_tuning_layers", None), getattr(module, "modules_to_save", None)):
            assert not isinstance(copies, nn.ModuleDict) or list(copies) == ["default"]
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")
    model.delete_adapter("default")
    assert model.active_adapters == [] and torch.equal(model.base_model(**MLP_X), make_tiny_model("mlp")(**MLP_X))


def test_mlp_fp16_bf16_forward_and_merge(mlp_row):
    for dtype in (torch.float16, torch.bfloat16):
        model = get_peft_model(make_tiny_model("mlp").to(dtype), LNTuningConfig(**mlp_row))
        # MLPLayerNorm casts its input to float32; feed the model's dtype directly to its layers instead.
        x = MLP_X["X"].to(dtype)
        base = model.get_base_model()
        out = base.lin1(base.layernorm1(base.relu(base.lin0(base.layernorm0(x)))))
        assert out.dtype == dtype
        model.merge_adapter()
        model.unmerge_adapter()
        plain = model.merge_and_unload()
        assert {p.dtype for p in plain.parameters()} == {dtype}
        assert torch.equal(plain.lin1(plain.layernorm1(plain.relu(plain.lin0(plain.layernorm0(x))))), out)


@pytest.mark.parametrize("same_targets", [False, True])
def test_mlp_requires_grad_per_adapter(same_targets):
    # PEFT's test_requires_grad_lntuning_different_targets / _same_targets.
    model = get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=["layernorm0"]))
    second = "layernorm0" if same_targets else "layernorm1"
    model.add_adapter("adapter1", LNTuningConfig(target_modules=[second]))
    default = {f"base_model.model.layernorm0.ln_tuning_layers.default.{p}" for p in ("weight", "bias")}
    adapter1 = {f"base_model.model.{second}.ln_tuning_layers.adapter1.{p}" for p in ("weight", "bias")}
    assert trainable_names(model) == default
    model.set_adapter("adapter1")
    assert trainable_names(model) == adapter1
    with model.disable_adapter():
        assert trainable_names(model) == set()
    assert trainable_names(model) == adapter1
    model.set_requires_grad("default")
    assert trainable_names(model) == default | adapter1
