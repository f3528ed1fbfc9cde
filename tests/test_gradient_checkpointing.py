"""Gradient checkpointing with LN tuning: adapter gradients equal the non-checkpointed run."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output

from lntune import LNTuningConfig, get_peft_model

# llama and t5 feed input_ids (Transformers 5 already enables input grads for them); vit feeds
# pixel_values, where reentrant checkpointing loses every block's gradient without lntune's fix.
KINDS = ["llama", "t5", "vit"]


def _peft_model(kind: str):
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig())
    return model.train()


def _adapter_grads(model, kind: str) -> dict[str, torch.Tensor | None]:
    model_output(model, make_inputs(kind, batch=3)).float().pow(2).mean().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_copy_calls(model) -> list[int]:
    """Count forward calls of the adapter copy of the first targeted layer (recomputation calls it twice)."""
    name = model.base_model.targeted_module_names[0]
    copy = model.get_base_model().get_submodule(name).ln_tuning_layers["default"]
    calls = [0]
    copy.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_gradients_match(kind: str, use_reentrant: bool) -> None:
    reference = _adapter_grads(_peft_model(kind), kind)

    model = _peft_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Transformers 5 renamed the method
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = _count_copy_calls(model)
    grads = _adapter_grads(model, kind)

    assert calls[0] == 2, "the first targeted block was not recomputed: checkpointing is not active"
    assert grads.keys() == reference.keys()
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"adapter params without gradient under checkpointing: {missing}"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)
    base_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not base_grads


def test_activation_checkpointing_enable_as_trainer_calls_it() -> None:
    """Transformers 5's Trainer calls ``activation_checkpointing_enable``; it gets the same fix."""
    reference = _adapter_grads(_peft_model("vit"), "vit")
    model = _peft_model("vit")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    calls = _count_copy_calls(model)
    grads = _adapter_grads(model, "vit")
    assert calls[0] == 2
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_enabling_twice_registers_one_input_hook() -> None:
    model = _peft_model("vit")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    embeddings = model.get_base_model().get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1


def test_model_without_checkpointing_says_so() -> None:
    model = get_peft_model(make_tiny_model("mlp"), LNTuningConfig(target_modules=["layernorm0"]))
    with pytest.raises(AttributeError, match="MLPLayerNorm has no gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_enabled_before_wrapping(use_reentrant: bool) -> None:
    """``base.gradient_checkpointing_enable(); get_peft_model(base, ...)`` gets the fix too."""
    reference = _adapter_grads(_peft_model("vit"), "vit")
    base = make_tiny_model("vit")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model = get_peft_model(base, LNTuningConfig()).train()
    calls = _count_copy_calls(model)
    grads = _adapter_grads(model, "vit")
    assert calls[0] == 2
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)
