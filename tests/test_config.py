"""LNTuningConfig: fields, validation and the adapter_config.json round trip (PEFT's keys)."""

from __future__ import annotations

import copy
import json
import pickle

import peft  # a test dependency: PEFT's own enums must be accepted
import pytest

from lntune import LNTuningConfig, PeftType, TaskType
from lntune.config import PEFT_FORMAT_VERSION

PEFT_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "exclude_modules",
    "inference_mode",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "revision",
    "target_modules",
    "task_type",
}


def test_defaults_and_dict_keys_are_peft_s():
    config = LNTuningConfig()
    data = config.to_dict()
    assert set(data) == PEFT_KEYS
    assert data["peft_type"] == "LN_TUNING"
    assert config.peft_type == PeftType.LN_TUNING
    assert (config.target_modules, config.exclude_modules, config.modules_to_save) == (None, None, None)
    assert config.task_type is None and config.inference_mode is False
    assert config.is_prompt_learning is False and config.is_adaption_prompt is False


@pytest.mark.parametrize("task_type", list(TaskType))
def test_every_task_type_accepted_as_enum_or_string(task_type):
    assert LNTuningConfig(task_type=task_type).task_type is task_type
    assert LNTuningConfig(task_type=task_type.value).task_type is task_type
    assert LNTuningConfig(task_type=task_type).to_dict()["task_type"] == task_type.value


def test_invalid_task_type_message_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        LNTuningConfig(task_type="FOO")
    assert str(info.value) == (
        "Invalid task type: 'FOO'. Must be one of the following task types: SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, "
        "TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION."
    )


@pytest.mark.parametrize("task_type", list(peft.TaskType))
def test_peft_s_own_enums_accepted(task_type):
    # str(peft.TaskType.CAUSAL_LM) is 'TaskType.CAUSAL_LM': the enum's value must be used, not its str().
    config = LNTuningConfig(task_type=task_type, peft_type=peft.PeftType.LN_TUNING)
    assert config.task_type is TaskType(task_type.value)
    assert config.to_dict()["task_type"] == task_type.value and config.peft_type is PeftType.LN_TUNING


def test_other_peft_type_becomes_ln_tuning_with_a_warning():
    # As in PEFT, an LNTuningConfig is always LN_TUNING (PEFT's test_set_attributes passes peft_type="test").
    with pytest.warns(UserWarning, match="ignores peft_type='LORA'"):
        config = LNTuningConfig(peft_type="LORA")
    assert config.peft_type is PeftType.LN_TUNING
    assert LNTuningConfig.from_dict(config.to_dict()).peft_type is PeftType.LN_TUNING


def test_fields_of_other_methods_refused():
    # Like PEFT: LNTuningConfig has no layers_to_transform / bias / init_weights.
    with pytest.raises(TypeError):
        LNTuningConfig(layers_to_transform=[0])


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save"])
def test_module_name_fields_validated(field):
    with pytest.raises(TypeError, match=field):
        LNTuningConfig(**{field: 3})
    with pytest.raises(TypeError, match=field):
        LNTuningConfig(**{field: ["norm", 1]})


def test_module_name_fields_normalised():
    config = LNTuningConfig(
        target_modules={"norm", "input_layernorm"}, exclude_modules=("a", "b"), modules_to_save="lm_head"
    )
    assert config.target_modules == ["input_layernorm", "norm"]  # sets sorted: deterministic files
    assert config.exclude_modules == ["a", "b"]
    assert config.modules_to_save == ["lm_head"]
    assert LNTuningConfig(target_modules=r".*norm").target_modules == r".*norm"


def test_save_and_load_round_trip(tmp_path):
    config = LNTuningConfig(
        task_type="CAUSAL_LM", target_modules=["norm"], exclude_modules=r".*0.*", modules_to_save=["lm_head"]
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(data) == PEFT_KEYS
    assert data["inference_mode"] is False  # the config as it is (PeftModel.save_pretrained writes true)
    loaded = LNTuningConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    # As PEFT's: from_json_file returns the file's dict, runtime_config (never meant for files) dropped.
    assert LNTuningConfig.from_json_file(tmp_path / "adapter_config.json") == config.to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "runtime_config": {"x": 1}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert LNTuningConfig.from_json_file(tmp_path / "adapter_config.json") == config.to_dict()


def test_from_pretrained_subfolder(tmp_path):
    LNTuningConfig(target_modules=["x"]).save_pretrained(tmp_path / "sub")
    assert LNTuningConfig.from_pretrained(tmp_path, subfolder="sub").target_modules == ["x"]


def test_unknown_keys_ignored_with_warning():
    data = {**LNTuningConfig().to_dict(), "layers_to_transform": None, "new_field": 1}
    message = r"Unexpected keyword arguments \['layers_to_transform', 'new_field'\] for class LNTuningConfig"
    with pytest.warns(UserWarning, match=message):
        config = LNTuningConfig.from_dict(data)
    assert config.peft_type == PeftType.LN_TUNING


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"missing required keys: \{'peft_type'\}"),
        ({"peft_type": "LORA"}, "peft_type is 'LORA'"),
        ({"peft_type": "LN_TUNING", "task_type": "FOO"}, "Invalid task type"),
        ({"peft_type": "LN_TUNING", "inference_mode": "yes"}, "'inference_mode' must be true or false"),
        ({"peft_type": "LN_TUNING", "target_modules": 7}, "target_modules"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_config_dicts_say_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message) as info:
        LNTuningConfig.from_dict(data, source="x/adapter_config.json")
    assert str(info.value).startswith("x/adapter_config.json")


def test_bad_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="local folders"):
        LNTuningConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No adapter config"):
        LNTuningConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LNTuningConfig.from_pretrained(tmp_path)


def test_missing_peft_type_is_also_peft_s_type_error():
    with pytest.raises(TypeError, match="is not an adapter config"):
        LNTuningConfig.from_dict({"foo": "bar"})


def test_peft_version_filled_in_and_kept():
    assert LNTuningConfig().peft_version == PEFT_FORMAT_VERSION == "0.21.2"
    assert LNTuningConfig.from_dict({"peft_type": "LN_TUNING", "peft_version": "0.10"}).peft_version == "0.10"
    assert LNTuningConfig.from_dict({"peft_type": "LN_TUNING", "peft_version": None}).peft_version == "0.21.2"


def test_copy_deepcopy_pickle_are_independent():
    config = LNTuningConfig(task_type="SEQ_CLS", target_modules=["norm"], modules_to_save=["classifier"])
    for clone in (config.copy(), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == config.to_dict()
        clone.target_modules.append("other")
        assert config.target_modules == ["norm"]


def test_enums_print_their_value():
    assert str(TaskType.CAUSAL_LM) == "CAUSAL_LM"
    assert str(PeftType.LN_TUNING) == "LN_TUNING"
    assert json.loads(LNTuningConfig(task_type="CAUSAL_LM").to_json_string())["task_type"] == "CAUSAL_LM"
