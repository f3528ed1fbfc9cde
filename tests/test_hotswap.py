"""hotswap_adapter: new adapter values in the existing copies, without recompiling a compiled model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output
from safetensors.torch import load_file, save_file
from torch._dynamo.testing import CompileCounter

from lntune import LNTuningConfig, PeftModel, get_peft_model, hotswap_adapter
from lntune.checkpoint import CheckpointError

TARGETS = ["layernorm0", "layernorm1"]


def _saved(tmp_path, name: str, seed: int, perturb, targets=TARGETS) -> tuple[str, torch.Tensor]:
    """Save an MLP adapter perturbed with ``seed``; returns its folder and its output."""
    model = get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=targets))
    perturb(model, scale=0.3, seed=seed)
    folder = os.fspath(tmp_path / name)
    model.save_pretrained(folder)
    with torch.no_grad():
        return folder, model_output(model, make_inputs("mlp"))


def _values(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_compiled_model_follows_the_swap_without_recompiling(tmp_path, perturb):
    a, out_a = _saved(tmp_path, "a", 1, perturb)
    b, out_b = _saved(tmp_path, "b", 2, perturb)
    model = PeftModel.from_pretrained(make_tiny_model("mlp"), a)
    params = dict(model.named_parameters())
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    inputs = make_inputs("mlp")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), out_a)
        compiled(**inputs)
        frames = counter.frame_count
        assert frames >= 1
        hotswap_adapter(compiled, b)
        torch.testing.assert_close(compiled(**inputs), out_b)
        compiled(**inputs)
    assert counter.frame_count == frames
    assert all(p is params[n] for n, p in model.named_parameters())  # same tensors, new values


def test_swap_into_a_merged_adapter(tmp_path, perturb):
    a, _ = _saved(tmp_path, "a", 1, perturb)
    b, out_b = _saved(tmp_path, "b", 2, perturb)
    model = PeftModel.from_pretrained(make_tiny_model("mlp"), a)
    model.merge_adapter()
    hotswap_adapter(model, b)
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, make_inputs("mlp")), out_b)
        model.unmerge_adapter()
        torch.testing.assert_close(model_output(model, make_inputs("mlp")), out_b)


def test_mismatched_adapters_are_refused_with_nothing_changed(tmp_path, perturb):
    a, _ = _saved(tmp_path, "a", 1, perturb)
    other, _ = _saved(tmp_path, "other", 2, perturb, targets=["layernorm0"])
    model = PeftModel.from_pretrained(make_tiny_model("mlp"), a)
    before = _values(model)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: .*missing key.*layernorm1"):
        hotswap_adapter(model, other)

    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.mkdir()
    tensors = load_file(os.path.join(a, "adapter_model.safetensors"))
    key = next(k for k in tensors if "layernorm1" in k)
    tensors[key] = torch.zeros(3)
    save_file(tensors, wrong_shape / "adapter_model.safetensors", metadata={"format": "pt"})
    (wrong_shape / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"wrong_shape.adapter_model\.safetensors: .*Shape mismatch"):
        hotswap_adapter(model, wrong_shape)

    with pytest.raises(ValueError, match="adapter 'nope': it does not exist"):
        hotswap_adapter(model, a, adapter_name="nope")

    lora = tmp_path / "lora"
    lora.mkdir()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        hotswap_adapter(model, lora)
    after = _values(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
