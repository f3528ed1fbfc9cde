"""Bad adapter folders: a clear error naming the file and key/field, and the model exactly as before.

Every case runs twice: through `PeftModel.from_pretrained` (the base model must come back untouched)
and through `load_adapter` on a model that already has a tuned adapter (that adapter, the active one,
the merge state and the gradients must be untouched, and no half-added adapter may remain).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable

import pytest
import torch
import transformers
from conftest import make_inputs, make_tiny_model, model_output
from safetensors.torch import load_file, save_file

from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model
from lntune.checkpoint import CheckpointError

ST = "adapter_model.safetensors"
BIN = "adapter_model.bin"
CFG = "adapter_config.json"
KEY = "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight"


# ---------------------------------------------------------------------------------------- helpers
def snapshot(model: torch.nn.Module) -> dict:
    """Everything loading could change: tensors, module types, grads, modes, configs, active/merged."""
    peft_config = getattr(model, "peft_config", {}) if isinstance(model, PeftModel) else {}
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "peft_config": {k: c.to_dict() for k, c in peft_config.items()},
        "active": model.active_adapter if isinstance(model, PeftModel) else None,
        "merged": model.base_model.merged if isinstance(model, PeftModel) else None,
        "targets": list(model.targeted_module_names) if isinstance(model, PeftModel) else None,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][key]), key
    for field in ("types", "grads", "training", "peft_config", "active", "merged", "targets"):
        assert before[field] == after[field], field


def save_tuned(kind: str, folder, perturb, **config) -> None:
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig(**config))
    perturb(model)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> str:
    """A tuned tiny-llama adapter (CAUSAL_LM, default targets)."""
    folder = tmp_path_factory.mktemp("good")
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def folder(good_folder, tmp_path) -> str:
    """A fresh copy of the good adapter, to corrupt."""
    path = tmp_path / "adapter"
    shutil.copytree(good_folder, path)
    return str(path)


def edit_tensors(fn: Callable[[dict], None]) -> Callable[[str], None]:
    def mutate(folder: str) -> None:
        tensors = load_file(os.path.join(folder, ST))
        fn(tensors)
        save_file(tensors, os.path.join(folder, ST), metadata={"format": "pt"})

    return mutate


def edit_config(**changes) -> Callable[[str], None]:
    def mutate(folder: str) -> None:
        path = os.path.join(folder, CFG)
        with open(path) as fh:
            data = json.load(fh)
        data.update(changes)
        with open(path, "w") as fh:
            json.dump(data, fh)

    return mutate


def write_file(name: str, data: bytes) -> Callable[[str], None]:
    def mutate(folder: str) -> None:
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)

    return mutate


def truncate(folder: str) -> None:
    path = os.path.join(folder, ST)
    with open(path, "rb") as fh:
        data = fh.read()
    write_file(ST, data[: len(data) // 2])(folder)


def set_key(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def to_bin(tensors_or_object) -> Callable[[str], None]:
    """Replace the safetensors file by a ``.bin`` holding ``tensors_or_object`` (None: random bytes)."""

    def mutate(folder: str) -> None:
        os.remove(os.path.join(folder, ST))
        if tensors_or_object is None:
            write_file(BIN, os.urandom(512))(folder)
        else:
            torch.save(tensors_or_object, os.path.join(folder, BIN))

    return mutate


# Each case: id, mutation of a good folder, exception type, substrings the message must contain
# ("{st}", "{cfg}", "{dir}" are replaced by the paths of the weights, the config and the folder).
CASES = [
    ("missing-weights", lambda f: os.remove(os.path.join(f, ST)), FileNotFoundError, ["{dir}", ST, BIN]),
    ("missing-config", lambda f: os.remove(os.path.join(f, CFG)), FileNotFoundError, ["{cfg}"]),
    ("truncated", truncate, CheckpointError, ["{st}", "safetensors"]),
    ("random-bytes", write_file(ST, os.urandom(4096)), CheckpointError, ["{st}"]),
    ("empty-weights", write_file(ST, b""), CheckpointError, ["{st}"]),
    ("not-json", write_file(CFG, b"{target_modules: oops"), ValueError, ["{cfg}", "JSON"]),
    ("config-not-object", write_file(CFG, b"[1, 2]"), ValueError, ["{cfg}", "object"]),
    ("target_modules-int", edit_config(target_modules=5), ValueError, ["{cfg}", "target_modules"]),
    ("inference_mode-str", edit_config(inference_mode="yes"), ValueError, ["{cfg}", "inference_mode"]),
    ("task_type-bad", edit_config(task_type="TRANSLATE"), ValueError, ["{cfg}", "TRANSLATE"]),
    ("peft_type-lora", edit_config(peft_type="LORA"), ValueError, ["{cfg}", "peft_type", "LORA"]),
    ("modules_to_save-dict", edit_config(modules_to_save={"a": 1}), ValueError, ["{cfg}", "modules_to_save"]),
    ("revision-list", edit_config(revision=[1]), ValueError, ["{cfg}", "revision"]),
    ("targets-absent", edit_config(target_modules=["ln_f"]), ValueError, ["{cfg}", "ln_f"]),
    ("missing-key", edit_tensors(lambda t: t.pop(KEY)), CheckpointError, ["{st}", "missing", KEY]),
    (
        "unexpected-key",
        edit_tensors(set_key("base_model.model.model.extra.weight", torch.ones(16))),
        CheckpointError,
        ["{st}", "unexpected", "base_model.model.model.extra.weight"],
    ),
    ("shape", edit_tensors(set_key(KEY, torch.ones(32))), CheckpointError, ["{st}", KEY, "(32,)", "(16,)"]),
    ("int-tensor", edit_tensors(set_key(KEY, torch.ones(16, dtype=torch.int64))), CheckpointError, [KEY, "int64"]),
    ("bool-tensor", edit_tensors(set_key(KEY, torch.ones(16, dtype=torch.bool))), CheckpointError, [KEY, "bool"]),
    ("nan", edit_tensors(set_key(KEY, torch.full((16,), float("nan")))), CheckpointError, ["{st}", KEY, "NaN"]),
    ("inf", edit_tensors(set_key(KEY, torch.full((16,), float("inf")))), CheckpointError, ["{st}", KEY, "infinite"]),
    ("bin-not-dict", to_bin([torch.ones(16)]), CheckpointError, [BIN, "string keys"]),
    ("bin-random", to_bin(None), CheckpointError, [BIN, "weights_only"]),
]


def expected_parts(parts: list[str], folder: str) -> list[str]:
    weights = os.path.join(folder, BIN if os.path.exists(os.path.join(folder, BIN)) else ST)
    paths = {"{st}": weights, "{cfg}": os.path.join(folder, CFG), "{dir}": folder}
    return [paths.get(p, p) for p in parts]


def assert_message(exc: BaseException, parts: list[str]) -> None:
    for part in parts:
        assert part in str(exc), f"{part!r} not in {exc}"


def loaded_model(folder: str, perturb, merged: bool) -> PeftModel:
    """A model with a tuned 'default' adapter (active, trainable; optionally merged)."""
    model = PeftModel.from_pretrained(make_tiny_model("llama"), folder, is_trainable=True)
    perturb(model, seed=3)
    if merged:
        model.merge_adapter()
    return model


# ------------------------------------------------------------------------------------------ cases
@pytest.mark.parametrize("mutate, exc_type, parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_from_pretrained_bad_folder_leaves_base_model_untouched(folder, mutate, exc_type, parts):
    mutate(folder)
    base = make_tiny_model("llama")
    before, out = snapshot(base), model_output(base, make_inputs("llama"))
    with pytest.raises(exc_type) as info:
        PeftModel.from_pretrained(base, folder)
    assert_message(info.value, expected_parts(parts, folder))
    assert_unchanged(before, snapshot(base))
    assert torch.equal(model_output(base, make_inputs("llama")), out)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("mutate, exc_type, parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_adapter_bad_folder_leaves_adapters_untouched(
    good_folder, folder, mutate, exc_type, parts, merged, perturb
):
    model = loaded_model(good_folder, perturb, merged)
    mutate(folder)
    before, out = snapshot(model), model_output(model, make_inputs("llama"))
    with pytest.raises(exc_type) as info:
        model.load_adapter(folder, adapter_name="new")
    assert_message(info.value, expected_parts(parts, folder))
    assert_unchanged(before, snapshot(model))
    assert torch.equal(model_output(model, make_inputs("llama")), out)
    # No half-added adapter: the name is free, and a good folder still loads under it.
    model.load_adapter(good_folder, adapter_name="new")
    assert set(model.peft_config) == {"default", "new"}


def test_missing_folder(tmp_path):
    base = make_tiny_model("llama")
    before = snapshot(base)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        PeftModel.from_pretrained(base, missing)
    assert_unchanged(before, snapshot(base))


def test_load_adapter_missing_folder_and_existing_name(good_folder, tmp_path, perturb):
    model = loaded_model(good_folder, perturb, merged=False)
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="nope"):
        model.load_adapter(str(tmp_path / "nope"), adapter_name="new")
    with pytest.raises(ValueError, match="'default' already exists"):
        model.load_adapter(good_folder, adapter_name="default")
    assert_unchanged(before, snapshot(model))


def test_adapter_from_other_hidden_size(tmp_path, perturb):
    config = make_tiny_model("llama").config.to_dict()
    config.update(hidden_size=32, head_dim=16)
    wide = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config))
    model = get_peft_model(wide, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    perturb(model)
    model.save_pretrained(tmp_path)
    base = make_tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(CheckpointError) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert_message(info.value, [os.path.join(tmp_path, ST), "(32,)", "(16,)", "ln_tuning_layers.weight"])
    assert_unchanged(before, snapshot(base))


@pytest.mark.parametrize("other", ["gpt2", "mlp", "opt"])
def test_adapter_for_another_architecture(tmp_path, perturb, other):
    save_tuned(other, tmp_path, perturb, target_modules=None if other != "mlp" else ["layernorm0"])
    base = make_tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "target_modules" in str(info.value) or "not found" in str(info.value)
    assert_unchanged(before, snapshot(base))


def test_adapter_with_other_layer_count_names_the_keys(tmp_path, perturb):
    config = make_tiny_model("llama").config.to_dict()
    config.update(num_hidden_layers=3)
    deeper = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config))
    model = get_peft_model(deeper, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    perturb(model)
    model.save_pretrained(tmp_path)
    base = make_tiny_model("llama")
    before = snapshot(base)
    with pytest.raises(CheckpointError, match=r"layers\.2\.input_layernorm"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(before, snapshot(base))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_other_float_dtypes_load_cast(folder, dtype, how, perturb):
    edit_tensors(lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))(folder)
    stored = load_file(os.path.join(folder, ST))
    if how == "from_pretrained":
        model, name = PeftModel.from_pretrained(make_tiny_model("llama"), folder), "default"
    else:
        model, name = PeftModel.from_pretrained(make_tiny_model("llama"), folder, adapter_name="a"), "b"
        model.load_adapter(folder, adapter_name=name)
    copy = model.base_model.model.model.layers[0].input_layernorm.ln_tuning_layers[name]
    assert copy.weight.dtype == torch.float32
    assert torch.equal(copy.weight, stored[KEY].float())


class _Exploit:
    """Unpickling this would create the marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_pickle_with_code_is_refused_and_not_run(good_folder, folder, tmp_path, perturb, how):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    os.remove(os.path.join(folder, ST))
    with open(os.path.join(folder, BIN), "wb") as fh:
        pickle.dump({KEY: _Exploit()}, fh)
    model = make_tiny_model("llama") if how == "from_pretrained" else loaded_model(good_folder, perturb, False)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        if how == "from_pretrained":
            PeftModel.from_pretrained(model, folder)
        else:
            model.load_adapter(folder, adapter_name="new")
    assert os.path.join(folder, BIN) in str(info.value)
    assert not marker.exists()
    assert_unchanged(before, snapshot(model))


def test_interrupt_during_copy_rolls_back(good_folder, perturb, monkeypatch):
    """Even a KeyboardInterrupt while tensors are being copied leaves the model as it was."""
    calls = {"n": 0}
    real_copy = torch.Tensor.copy_

    def flaky_copy(self, src, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_copy(self, src, *args, **kwargs)

    model = loaded_model(good_folder, perturb, merged=False)
    base = make_tiny_model("llama")
    before_model, before_base = snapshot(model), snapshot(base)
    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(KeyboardInterrupt):
        model.load_adapter(good_folder, adapter_name="new")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        PeftModel.from_pretrained(base, good_folder)
    monkeypatch.undo()
    assert_unchanged(before_model, snapshot(model))
    assert_unchanged(before_base, snapshot(base))


def test_user_config_object_is_not_changed_on_failure(folder):
    edit_tensors(lambda t: t.pop(KEY))(folder)
    config = LNTuningConfig(task_type=TaskType.SEQ_CLS, target_modules=["LayerNorm"])
    before = config.to_dict()
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(make_tiny_model("bert"), folder, config=config)
    assert config.to_dict() == before


def test_saved_base_weights_that_differ_are_refused(tmp_path, perturb):
    """PEFT-style ``base_layer`` keys (embedding targets) must equal the base model's: lntune never changes it."""
    save_tuned("llama", tmp_path, perturb, target_modules=["embed_tokens", "norm"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    edit_tensors(set_key(key, make_tiny_model("llama").model.embed_tokens.weight.detach().clone()))(str(tmp_path))
    PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)  # equal originals: accepted
    other_base = make_tiny_model("llama", seed=1)
    before = snapshot(other_base)
    with pytest.raises(CheckpointError) as info:
        PeftModel.from_pretrained(other_base, tmp_path)
    assert_message(info.value, [os.path.join(tmp_path, ST), key, "base-model weights"])
    assert_unchanged(before, snapshot(other_base))


def test_from_pretrained_on_an_already_wrapped_model_is_refused(good_folder, perturb):
    """Wrapping the same base twice would overwrite the first PeftModel's tuned copies: refused, nothing lost."""
    first = loaded_model(good_folder, perturb, merged=False)
    before = snapshot(first)
    with pytest.raises(ValueError, match="already contains lntune adapters"):
        PeftModel.from_pretrained(first.get_base_model(), good_folder)
    with pytest.raises(ValueError, match="already contains lntune adapters"):
        PeftModel.from_pretrained(first.get_base_model(), good_folder, adapter_name="other")
    assert_unchanged(before, snapshot(first))


def test_restore_on_error_refuses_an_existing_adapter_name(good_folder, perturb):
    from lntune.model import restore_on_error

    model = loaded_model(good_folder, perturb, merged=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already holds adapter 'default'"), restore_on_error(model, "default"):
        raise AssertionError("not reached")
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_failure_midway_through_injection_rolls_back(good_folder, perturb, monkeypatch, how):
    """Some layers already wrapped when the error hits: every one of them is put back."""
    from lntune.model import LNTuningModel

    real = LNTuningModel._create_and_replace
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    model = make_tiny_model("llama") if how == "from_pretrained" else loaded_model(good_folder, perturb, merged=True)
    before = snapshot(model)
    monkeypatch.setattr(LNTuningModel, "_create_and_replace", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        if how == "from_pretrained":
            PeftModel.from_pretrained(model, good_folder)
        else:
            model.load_adapter(good_folder, adapter_name="new")
    monkeypatch.undo()
    assert calls["n"] == 3
    assert_unchanged(before, snapshot(model))
