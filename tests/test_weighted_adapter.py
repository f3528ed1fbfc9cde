"""add_weighted_adapter: a new adapter whose copies are a weighted sum of existing adapters' copies."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output

from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model


def _two_adapters(kind: str, perturb, task_type=None) -> PeftModel:
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig(task_type=task_type), adapter_name="a")
    model.add_adapter("b", LNTuningConfig(task_type=task_type))
    for seed, name in enumerate(["b", "a"]):
        model.set_adapter(name)
        perturb(model, scale=0.2, seed=seed + 1)
    return model


def _copies(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors by module path (LN copies and modules_to_save copies)."""
    out = {}
    for name, tensor in model.state_dict().items():
        for marker in (f".ln_tuning_layers.{adapter}.", f".modules_to_save.{adapter}."):
            if marker in name:
                out[name.replace(marker, ".")] = tensor
    return out


def test_weights_one_zero_reproduce_the_first_adapter(perturb):
    model = _two_adapters("llama", perturb)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "c")
    assert model.active_adapter == "a"
    a, c = _copies(model, "a"), _copies(model, "c")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model_output(model, inputs)
        model.set_adapter("c")
        assert torch.equal(model_output(model, inputs), expected)
    assert all(p.requires_grad == (".c." in n) for n, p in model.named_parameters())


def test_half_half_gives_the_mean_including_modules_to_save(perturb):
    model = _two_adapters("bert", perturb, task_type=TaskType.SEQ_CLS)
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mean")
    a, b, mean = _copies(model, "a"), _copies(model, "b"), _copies(model, "mean")
    assert any("classifier" in k for k in mean)
    assert mean.keys() == a.keys()
    for key in mean:
        torch.testing.assert_close(mean[key], (a[key] + b[key]) / 2)
    assert not torch.equal(mean[next(iter(mean))], a[next(iter(a))])


def test_adapters_on_different_modules_and_bad_arguments_are_refused(perturb):
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(target_modules=["norm"]), adapter_name="a")
    model.add_adapter("b", LNTuningConfig(target_modules=["norm", "input_layernorm"]))
    with pytest.raises(ValueError, match="module 'model.layers.0.input_layernorm' has copies of \\['b'\\]"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1.0], "c")
    with pytest.raises(ValueError, match="Adapter nope not found"):
        model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "c")
    assert set(model.peft_config) == {"a", "b"}
