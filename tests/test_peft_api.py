"""The rest of PEFT's PeftModel API: statuses, hub upload, loading options, base-model state, no fall-through."""

from __future__ import annotations

import dataclasses
import json
import sys

import peft  # a test dependency: PEFT's own API is the reference here
import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output, trainable_names
from torch import nn

import lntune
from lntune import (
    LNTuningConfig,
    PeftModel,
    TaskType,
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_model,
    inject_adapter_in_model,
    set_base_model_state_dict,
)
from lntune.hub import HubUploadError
from lntune.model import NOT_IN_LNTUNE

LLAMA = LNTuningConfig(task_type=TaskType.CAUSAL_LM)


def _llama(**config) -> PeftModel:
    return get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type=TaskType.CAUSAL_LM, **config))


def _peft_public_names() -> list[str]:
    """Public names of PEFT's PeftModel classes and of its LN tuner (which PEFT's PeftModel forwards to)."""
    classes = [peft.PeftModel, peft.tuners.ln_tuning.LNTuningModel]
    classes += [getattr(peft, name) for name in dir(peft) if name.startswith("PeftModelFor")]
    names = {n for cls in classes for n in dir(cls) if not n.startswith("_")}
    return sorted(names - set(dir(nn.Module)))


def _defined_by_lntune(model: PeftModel, name: str) -> bool:
    owners = (*type(model).__mro__, *type(model.base_model).__mro__)
    return any(name in vars(cls) for cls in owners if cls.__module__.startswith("lntune"))


# --------------------------------------------------------------------------- no fall-through
@pytest.mark.parametrize("name", _peft_public_names())
def test_no_peft_name_reaches_the_base_model(name):
    # A Transformers model has push_to_hub, prepare_inputs_for_generation...: PeftModel.__getattr__ must never
    # hand a PEFT name on to it. Each name is lntune's own, or refused with an lntune message.
    model = _llama()
    if _defined_by_lntune(model, name):
        return
    with pytest.raises(AttributeError, match=f"PeftModel.{name} is not part of lntune"):
        getattr(model, name)
    assert name in NOT_IN_LNTUNE


def test_not_in_lntune_lists_only_peft_names():
    assert set(NOT_IN_LNTUNE) <= set(_peft_public_names())
    assert not hasattr(_llama(), "get_prompt")
    with pytest.raises(AttributeError, match="get_model_config is not part of lntune"):
        _llama().base_model.get_model_config  # the tuner refuses them too  # noqa: B018
    assert _llama().config.model_type == "llama"  # other names still reach the base model


def test_small_peft_members():
    model = _llama()
    assert model._is_prompt_learning is False and model.supports_lora_conversion() is False
    assert model.active_peft_config is model.peft_config["default"]
    assert model.base_model_torch_dtype == torch.float32
    inputs = make_inputs("llama")
    assert torch.equal(model.prepare_inputs_for_generation(**inputs)["input_ids"], inputs["input_ids"])
    model.add_adapter("other", LNTuningConfig(target_modules=["norm"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="exactly one active adapter"):
        model.active_peft_config  # noqa: B018


def test_has_active_enabled_adapter():
    model = _llama()
    assert model.has_active_enabled_adapter
    with model.disable_adapter():
        with model.disable_adapter():
            assert not model.has_active_enabled_adapter
        assert not model.has_active_enabled_adapter
    assert model.has_active_enabled_adapter
    model.disable_adapter_layers()
    assert not model.has_active_enabled_adapter
    model.enable_adapter_layers()
    model.delete_adapter("default")
    assert not model.has_active_enabled_adapter


def test_prepare_model_for_gradient_checkpointing():
    class Custom(nn.Module):  # no enable_input_require_grads: the embeddings' forward hook is used
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.norm = nn.LayerNorm(4)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, ids):
            return self.norm(self.embed(ids))

    for base in (make_tiny_model("llama"), Custom()):
        model = get_peft_model(base, LNTuningConfig(target_modules=["norm"]))
        embeddings = base.get_input_embeddings()
        assert not embeddings(torch.tensor([1])).requires_grad
        assert model.prepare_model_for_gradient_checkpointing(base) is base
        assert embeddings(torch.tensor([1])).requires_grad


# ---------------------------------------------------------------------------------- status
def test_layer_and_model_status_follow_the_model(perturb):
    model = _llama()
    model.add_adapter("other", LNTuningConfig(target_modules=["norm"]))
    layers = model.get_layer_status()
    assert [s.name for s in layers] == [f"model.{n}" for n in model.base_model.targeted_module_names]
    norm = next(s for s in layers if s.name == "model.model.norm")
    assert norm.module_type == "ln_tuning.LNTuningLayer" and norm.enabled and norm.active_adapters == ["default"]
    assert norm.available_adapters == ["default", "other"] and norm.devices == {"default": ["cpu"], "other": ["cpu"]}
    assert norm.requires_grad == {"default": True, "other": False} and norm.merged_adapters == []

    status = model.get_model_status()
    assert (status.base_model_type, status.adapter_model_type) == ("LlamaForCausalLM", "LNTuningModel")
    assert status.peft_types == {"default": "LN_TUNING", "other": "LN_TUNING"}
    assert (status.trainable_params, status.total_params) == model.get_nb_trainable_parameters()
    assert status.num_adapter_layers == 5 and status.enabled is True and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False} and status.quantization_backend is None

    model.merge_adapter()  # merged: requires_grad is read on the tuned copies wherever the merge put them
    status = model.get_model_status()
    assert status.merged_adapters == ["default"] and status.requires_grad["default"] is True
    model.unmerge_adapter()
    model.base_model.model.model.norm.enable_adapters(False)
    model.base_model.model.model.norm.set_requires_grad("default", False)
    status = get_model_status(model)
    assert status.enabled == "irregular" and status.requires_grad["default"] == "irregular"


def test_status_fields_are_peft_s():
    from peft.peft_model import TunerLayerStatus, TunerModelStatus

    for ours, theirs in ((lntune.TunerLayerStatus, TunerLayerStatus), (lntune.TunerModelStatus, TunerModelStatus)):
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


def test_status_of_an_injected_model_and_of_a_plain_one():
    model = inject_adapter_in_model(LNTuningConfig(target_modules=["norm"]), make_tiny_model("llama"))
    status = get_model_status(model)
    assert (status.base_model_type, status.adapter_model_type, status.peft_types) == ("LlamaForCausalLM", "None", {})
    assert [s.name for s in get_layer_status(model)] == ["model.norm"]
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        get_model_status(make_tiny_model("llama"))


# ------------------------------------------------------------------------------ push_to_hub
def test_push_to_hub_offline_fails_in_one_line_and_uploads_nothing(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="offline mode") as info:
        _llama().push_to_hub("someone/adapter")
    assert "\n" not in str(info.value) and "someone/adapter" in str(info.value)


def test_push_to_hub_without_huggingface_hub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import of it fails, as when not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        _llama().push_to_hub("someone/adapter")


# -------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_is_trainable_makes_the_inactive_adapter_trainable(tmp_path, perturb, is_trainable):
    source = _llama()
    perturb(source)
    source.save_pretrained(tmp_path)
    model = _llama()
    model.load_adapter(tmp_path, adapter_name="loaded", is_trainable=is_trainable)
    assert model.active_adapters == ["default"]  # loaded, not activated
    loaded = {n for n in trainable_names(model) if ".loaded." in n}
    assert len(loaded) == (5 if is_trainable else 0)
    assert {n for n in trainable_names(model) if ".default." in n}  # the active adapter keeps training
    assert model.peft_config["loaded"].inference_mode is not is_trainable


def test_from_pretrained_keeps_the_given_config_object(tmp_path, perturb):
    source = _llama()
    perturb(source)
    source.save_pretrained(tmp_path)
    config = LNTuningConfig(task_type=TaskType.CAUSAL_LM)
    model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path, config=config)
    assert model.peft_config["default"] is config and config.inference_mode is True


def test_from_pretrained_failure_leaves_the_given_config_as_it_was(tmp_path, perturb):
    _llama().save_pretrained(tmp_path)
    config = LNTuningConfig(target_modules=["no_such_module"])
    before = config.to_dict()
    base = make_tiny_model("llama")
    with pytest.raises(ValueError, match="no_such_module"):
        PeftModel.from_pretrained(base, tmp_path, config=config, is_trainable=True)
    assert config.to_dict() == before


def test_autocast_adapter_dtype_of_the_model_is_the_default_of_add_and_load(tmp_path):
    model = get_peft_model(make_tiny_model("llama").to(torch.bfloat16), LLAMA, autocast_adapter_dtype=False)
    model.add_adapter("same", LNTuningConfig(target_modules=["norm"]))
    model.add_adapter("upcast", LNTuningConfig(target_modules=["norm"]), autocast_adapter_dtype=True)
    norm = model.base_model.model.model.norm.ln_tuning_layers
    assert (norm["default"].weight.dtype, norm["same"].weight.dtype) == (torch.bfloat16, torch.bfloat16)
    assert norm["upcast"].weight.dtype == torch.float32
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    model.load_adapter(tmp_path, adapter_name="loaded")
    assert norm["loaded"].weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------- files
def _card_metadata(folder) -> list[str]:
    """The YAML lines of the model card's front matter."""
    return (folder / "README.md").read_text().split("---")[1].strip().splitlines()


def test_saved_config_says_inference_mode_and_card_names_only_real_base_models(tmp_path):
    model = get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=["layernorm0"]))
    model.peft_config["default"].base_model_name_or_path = "MLP_LayerNorm"  # not a Hub id: no base_model line
    model.save_pretrained(tmp_path / "mlp")
    assert json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())["inference_mode"] is True
    assert model.peft_config["default"].inference_mode is False
    assert "library_name: peft" in _card_metadata(tmp_path / "mlp")
    assert not [line for line in _card_metadata(tmp_path / "mlp") if line.startswith("base_model")]

    base = make_tiny_model("llama")
    base.config._name_or_path = "org/tiny-llama"  # as from_pretrained("org/tiny-llama") sets it
    get_peft_model(base, LLAMA.copy()).save_pretrained(tmp_path / "llama")
    assert "base_model: org/tiny-llama" in _card_metadata(tmp_path / "llama")
    get_peft_model(make_tiny_model("llama"), LLAMA.copy()).save_pretrained(tmp_path / "from-config")
    assert not [line for line in _card_metadata(tmp_path / "from-config") if line.startswith("base_model")]


# ------------------------------------------------------------------------- base model state
@pytest.mark.parametrize("merged", [False, True])
def test_base_model_state_dict_is_the_original_one(perturb, merged):
    base = make_tiny_model("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = _llama(modules_to_save=["lm_head"])
    perturb(model)
    if merged:
        model.merge_adapter()
    state = get_base_model_state_dict(model)
    assert list(state) == list(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_set_base_model_state_dict_round_trip_and_refusals(perturb):
    model = _llama(modules_to_save=["lm_head"])
    perturb(model)
    inputs = make_inputs("llama")
    original = {k: v.clone() for k, v in get_base_model_state_dict(model).items()}
    with torch.no_grad():
        tuned = model_output(model, inputs)
        for tensor in get_base_model_state_dict(model).values():  # the base weights only, in place
            tensor.add_(1.0)
    changed = {k: v.clone() for k, v in get_base_model_state_dict(model).items()}
    for bad, message in [
        ({**original, "extra.weight": torch.ones(1)}, "Unexpected key"),
        ({k: v for k, v in original.items() if k != "model.norm.weight"}, "Missing key"),
        ({**original, "model.norm.weight": torch.ones(3)}, "size mismatch for model.norm.weight"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            set_base_model_state_dict(model, bad)
        assert all(torch.equal(get_base_model_state_dict(model)[k], v) for k, v in changed.items())
    assert set_base_model_state_dict(model, original) == ([], [])
    with torch.no_grad():
        assert torch.equal(model_output(model, inputs), tuned)  # the adapters were not touched
    partial = set_base_model_state_dict(model, {"model.norm.weight": original["model.norm.weight"]}, strict=False)
    assert "lm_head.weight" in partial.missing_keys and partial.unexpected_keys == []


def test_peft_s_base_model_state_dict_keys_match_ours():
    ours = get_base_model_state_dict(_llama())
    theirs = peft.get_base_model_state_dict(peft.get_peft_model(make_tiny_model("llama"), peft.LNTuningConfig()))
    assert set(ours) == set(theirs) == set(make_tiny_model("llama").state_dict())
