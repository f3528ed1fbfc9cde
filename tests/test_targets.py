"""Target selection: name matching, per-architecture defaults, norm detection by type, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output
from torch import nn

from lntune import TARGET_MODULES_BY_MODEL_TYPE, LNTuningConfig, LNTuningLayer, detect_norm_layers, get_peft_model
from lntune.modules_to_save import ModulesToSaveWrapper
from lntune.targets import closest_names, compact_target_list, is_norm_layer, name_matches

# PEFT 0.21.2's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING keys (reference doc §0).
PEFT_MODEL_TYPES = [
    "llama",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "bloom",
    "falcon",
    "gpt2",
    "gptj",
    "t5",
    "mt5",
    "bart",
    "phi",
    "qwen2",
    "qwen3",
    "blip-2",
    "llava",
]
EXTRA_MODEL_TYPES = ["bert", "roberta", "opt", "vit", "whisper", "gpt_neox"]


def wrapped_names(model: nn.Module, cls: type = LNTuningLayer) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


class CustomNorm(nn.Module):
    """A norm unknown to torch, recognised by its class name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True) * self.scale


class ManyNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.group = nn.GroupNorm(2, 4)
        self.batch = nn.BatchNorm1d(4)
        self.custom = CustomNorm(4)
        self.no_affine = nn.LayerNorm(4, elementwise_affine=False)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = self.group(self.batch(self.ln(x)))
        return self.lin(self.block(self.no_affine(self.custom(self.rms(x)))))


# --------------------------------------------------------------------------- matching rules
@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("model.norm", ["norm"], True),
        ("model.layers.0.input_layernorm", ["norm"], False),  # suffix match is per component
        ("model.layers.0.input_layernorm", ["layers.0.input_layernorm"], True),
        ("model.layers.0.input_layernorm", ["model.layers.0.input_layernorm"], True),
        ("model.layers.0.input_layernorm", r".*\.0\..*norm", True),  # string: regex fullmatch
        ("model.layers.0.input_layernorm", r"input_layernorm", False),
        ("model.layers.10.input_layernorm", r".*\.1\..*", False),
        ("x", None, False),
        ("x", [], False),
    ],
)
def test_name_matches(name, patterns, expected):
    assert name_matches(name, patterns) is expected


def test_is_norm_layer_by_type_and_name():
    model = ManyNorms()
    assert detect_norm_layers(model) == ["ln", "rms", "group", "batch", "custom", "block.1"]
    assert not is_norm_layer(model.no_affine)  # nothing to tune
    assert not is_norm_layer(model.block)
    assert not is_norm_layer(model.lin)


def test_compact_target_list():
    llama = make_tiny_model("llama")
    norms = detect_norm_layers(llama)
    assert compact_target_list(llama, norms) == ["input_layernorm", "norm", "post_attention_layernorm"]
    # Only the layer-0 norm: its leaf name would also select layer 1, so full names are kept.
    assert compact_target_list(llama, norms[:1]) == ["model.layers.0.input_layernorm"]


def test_closest_names():
    names = ["model.layers.0.input_layernorm", "model.norm", "lm_head"]
    assert closest_names(["input_layernrom"], names)[0] == "model.layers.0.input_layernorm"
    assert closest_names(["zzz"], names) == []


# --------------------------------------------------------------------------- defaults table
def test_default_table_covers_peft_and_extra_architectures():
    for model_type in PEFT_MODEL_TYPES + EXTRA_MODEL_TYPES:
        assert TARGET_MODULES_BY_MODEL_TYPE[model_type], model_type
    # The deliberate departures from PEFT's table: qwen lists every norm, llava only norms.
    assert set(TARGET_MODULES_BY_MODEL_TYPE["qwen2"]) >= {"input_layernorm", "post_attention_layernorm", "norm"}
    assert not {"embed_tokens", "lm_head", "multi_modal_projector"} & set(TARGET_MODULES_BY_MODEL_TYPE["llava"])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gpt2", "opt", "bert", "t5", "bart", "vit"])
def test_defaults_select_the_norm_layers(kind):
    model = make_tiny_model(kind)
    norms = detect_norm_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known architecture chooses silently
        peft_model = get_peft_model(model, LNTuningConfig())
    targeted = peft_model.targeted_module_names
    assert targeted == wrapped_names(model)
    assert peft_model.peft_config["default"].target_modules == TARGET_MODULES_BY_MODEL_TYPE[model.config.model_type]
    if kind == "bart":  # PEFT's bart default leaves out the embedding norms; so do we
        left_out = ["model.decoder.layernorm_embedding", "model.encoder.layernorm_embedding"]
        assert sorted(set(norms) - set(targeted)) == left_out
    else:
        assert targeted == norms


def test_unknown_architecture_detects_norms_and_says_which():
    model = make_tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.warns(UserWarning) as record:
        peft_model = get_peft_model(model, LNTuningConfig())
    assert len(record) == 1
    message = str(record[0].message)
    assert "'mystery'" in message and "5 normalization layers" in message
    assert "['input_layernorm', 'norm', 'post_attention_layernorm']" in message
    assert peft_model.peft_config["default"].target_modules == ["input_layernorm", "norm", "post_attention_layernorm"]
    assert peft_model.targeted_module_names == detect_norm_layers(make_tiny_model("llama"))


def test_plain_module_detection_wraps_each_norm_type():
    model = ManyNorms().eval()
    x = torch.randn(3, 4)
    base = model(x)
    with pytest.warns(UserWarning, match="6 normalization layers"):
        peft_model = get_peft_model(model, LNTuningConfig())
    assert peft_model.targeted_module_names == ["ln", "rms", "group", "batch", "custom", "block.1"]
    assert torch.equal(peft_model(x), base)


def test_no_norm_and_no_default_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(model, LNTuningConfig())
    assert all(p.requires_grad for p in model.parameters())  # model untouched


# -------------------------------------------------------------------------- explicit targets
def test_unmatched_target_names_the_closest_modules():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError) as info:
        get_peft_model(model, LNTuningConfig(target_modules=["input_layernrom"]))
    message = str(info.value)
    assert "['input_layernrom'] not found" in message and "input_layernorm" in message
    assert wrapped_names(model) == []


def test_regex_string_target_is_a_fullmatch():
    model = make_tiny_model("llama")
    get_peft_model(model, LNTuningConfig(target_modules=r"model\.layers\.\d+\.input_layernorm"))
    assert wrapped_names(model) == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]


def test_exclude_modules_list_and_regex():
    model = make_tiny_model("llama")
    get_peft_model(model, LNTuningConfig(exclude_modules=["norm"]))  # suffix: not input_layernorm
    assert len(wrapped_names(model)) == 4 and "model.norm" not in wrapped_names(model)
    model = make_tiny_model("llama")
    get_peft_model(model, LNTuningConfig(exclude_modules=r".*layers\.0\..*"))
    assert wrapped_names(model) == [
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]


def test_everything_excluded_raises():
    model = make_tiny_model("mlp")
    with pytest.raises(ValueError, match="excluded by exclude_modules or listed in modules_to_save"):
        get_peft_model(model, LNTuningConfig(target_modules=["layernorm0"], exclude_modules=["layernorm0"]))
    with pytest.raises(ValueError, match="excluded by exclude_modules or listed in modules_to_save"):
        get_peft_model(model, LNTuningConfig(target_modules=["layernorm0"], modules_to_save=["layernorm0"]))


def test_unmatched_modules_to_save_raises():
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\] matches no module"):
        get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=["layernorm0"], modules_to_save=["head"]))


@pytest.mark.parametrize(("kind", "head"), [("bert", "classifier"), ("vit", "classifier")])
def test_seq_cls_adds_its_head_to_modules_to_save(kind, head):
    model = make_tiny_model(kind)
    peft_model = get_peft_model(model, LNTuningConfig(task_type="SEQ_CLS"))
    assert peft_model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert wrapped_names(model, ModulesToSaveWrapper) == [head]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {f"base_model.model.{head}.modules_to_save.default.weight"} <= trainable


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["lin0"], ["lin0"]),  # a Linear
        (["self_attn"], ["model.layers.0.self_attn", "model.layers.1.self_attn"]),  # whole blocks
        (["mlp", "down_proj"], ["model.layers.0.mlp", "model.layers.1.mlp"]),  # never inside another target
    ],
)
def test_any_module_can_be_a_target(targets, expected):
    kind = "mlp" if targets == ["lin0"] else "llama"
    model = make_tiny_model(kind)
    inputs = make_inputs(kind)
    base = model_output(model, inputs).detach()
    peft_model = get_peft_model(model, LNTuningConfig(target_modules=targets))
    assert wrapped_names(model) == expected
    assert torch.equal(model_output(peft_model, inputs), base)
