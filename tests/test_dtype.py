"""Float32 adapters on bfloat16 models (autocast_adapter_dtype): they learn, save, load and merge."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output

from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model
from lntune.precision import CastCall

BF16 = torch.bfloat16


def _bf16_base() -> torch.nn.Module:
    base = make_tiny_model("llama")
    with torch.no_grad():  # larger logits: the loss then reacts clearly to the norms (bf16 rounds small changes)
        base.lm_head.weight.mul_(30)
    return base.to(BF16)


def _bf16_llama(autocast: bool = True) -> PeftModel:
    config = LNTuningConfig(task_type=TaskType.CAUSAL_LM)
    return get_peft_model(_bf16_base(), config, autocast_adapter_dtype=autocast)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, steps: int = 20, lr: float = 1e-4) -> list[float]:
    """AdamW on one fixed batch; returns the loss before each step and after the last."""
    inputs = make_inputs("llama", batch=4, seq=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(model(**inputs, labels=inputs["input_ids"]).loss.item())
    return losses


def test_bf16_model_gets_float32_adapters_and_bf16_outputs():
    base = make_tiny_model("llama").to(BF16)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model_output(base, inputs)
    model = get_peft_model(base, LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == BF16 for n, p in model.named_parameters() if "ln_tuning_layers" not in n)
    with torch.no_grad():
        out = model_output(model, inputs)
    assert out.dtype == BF16
    # A fresh float32 copy holds the bf16 values exactly, so the output is the base model's, bit for bit.
    assert torch.equal(out, expected)


def test_float32_adapter_learns_at_lr_1e4_where_bf16_does_not():
    model = _bf16_llama()
    before = _trainable(model)
    losses = _train(model)
    after = _trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    # Forward sees the float32 weights rounded to bf16, so the loss moves once updates add up to a bf16 step.
    assert losses[-1] < losses[0] - 0.01
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    frozen = _bf16_llama(autocast=False)
    before = _trainable(frozen)
    assert all(p.dtype == BF16 for p in before.values())
    _train(frozen)
    # In bf16, weights near 1.0 move in steps of ~0.004: AdamW's updates of ~1e-4 round away.
    assert all(torch.equal(before[n], p) for n, p in _trainable(frozen).items())


def test_float32_adapter_save_load_and_merge(tmp_path, perturb):
    model = _bf16_llama()
    perturb(model, scale=0.01)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model_output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_bf16_base(), tmp_path)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    restored = dict(loaded.named_parameters())
    assert all(restored[n].dtype == torch.float32 and torch.equal(restored[n], p) for n, p in saved.items())
    with torch.no_grad():
        assert torch.equal(model_output(loaded, inputs), expected)
        loaded.merge_adapter()
        assert torch.equal(model_output(loaded, inputs), expected)
        loaded.unmerge_adapter()
    merged = loaded.merge_and_unload()
    assert all(p.dtype == BF16 for p in merged.parameters())
    with torch.no_grad():
        assert torch.equal(model_output(merged, inputs), expected)


def test_modules_to_save_copies_are_float32_and_run_in_bf16(perturb):
    base = make_tiny_model("bert").to(BF16)
    model = get_peft_model(base, LNTuningConfig(task_type=TaskType.SEQ_CLS))
    head = model.base_model.model.classifier
    assert head.modules_to_save["default"].weight.dtype == torch.float32
    assert head.original_module.weight.dtype == BF16
    perturb(model, scale=0.01)
    inputs = make_inputs("bert")
    out = model_output(model, inputs)
    assert out.dtype == BF16
    out.float().sum().backward()
    assert head.modules_to_save["default"].weight.grad.dtype == torch.float32
    merged = model.merge_and_unload()
    assert merged.classifier.weight.dtype == BF16
    with torch.no_grad():
        assert torch.equal(model_output(merged, inputs), out.detach())


def test_to_float32_drops_the_cast_and_cast_call_restores_parameters():
    model = _bf16_llama()
    layer = model.base_model.model.model.norm
    assert isinstance(layer._selected_forward, CastCall)
    copy = layer.ln_tuning_layers["default"]
    weight = copy.weight
    layer(torch.ones(1, 2, 16, dtype=BF16))
    assert copy.weight is weight and isinstance(copy._parameters["weight"], torch.nn.Parameter)
    model.to(torch.float32)
    assert layer.compute_dtype == torch.float32
    assert layer._direct is copy  # no cast any more: the copy itself runs, directly


def _fp32_base() -> torch.nn.Module:
    base = make_tiny_model("llama")
    with torch.no_grad():
        base.lm_head.weight.mul_(30)  # as in _bf16_base
    return base


CASTS = {  # name: (cast, the model's dtype after it)
    "to(bf16)": (lambda m: m.to(BF16), BF16),
    "to(dtype=fp16)": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "half()": (lambda m: m.half(), torch.float16),
    "bfloat16()": (lambda m: m.bfloat16(), BF16),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_casting_after_wrapping_keeps_float32_adapters(cast, perturb):
    model = get_peft_model(_fp32_base(), LNTuningConfig(task_type=TaskType.CAUSAL_LM, modules_to_save=["lm_head"]))
    perturb(model, scale=0.01)
    tuned = _trainable(model)
    apply, low = CASTS[cast]
    apply(model)
    params = dict(model.named_parameters())
    for name, value in tuned.items():  # exact values: the cast did not round them through low precision
        assert params[name].dtype == torch.float32 and torch.equal(params[name], value), name
    assert {n: p.dtype for n, p in params.items() if n not in tuned and p.dtype != low} == {}
    with torch.no_grad():
        assert model_output(model, make_inputs("llama")).dtype == low


def test_float32_adapters_learn_after_the_model_is_cast_to_bf16():
    model = get_peft_model(_fp32_base(), LNTuningConfig(task_type=TaskType.CAUSAL_LM)).to(BF16)
    before = _trainable(model)
    assert before and all(p.dtype == torch.float32 for p in before.values())
    losses = _train(model)
    assert all(not torch.equal(before[n], p) for n, p in _trainable(model).items())
    assert losses[-1] < losses[0] - 0.01


def test_adapters_without_autocast_follow_the_model_dtype():
    model = get_peft_model(_fp32_base(), LNTuningConfig(task_type=TaskType.CAUSAL_LM), autocast_adapter_dtype=False)
    model.add_adapter("kept", LNTuningConfig(task_type=TaskType.CAUSAL_LM), autocast_adapter_dtype=True)
    model.add_adapter("inherits", LNTuningConfig(task_type=TaskType.CAUSAL_LM))  # as the model was created
    model.to(BF16)
    params = dict(model.named_parameters())
    for adapter, dtype in (("default", BF16), ("inherits", BF16), ("kept", torch.float32)):
        assert {p.dtype for n, p in params.items() if f".ln_tuning_layers.{adapter}." in n} == {dtype}, adapter
    model.to(torch.float64)  # a cast to a wider type applies to every adapter
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_inference_casts_each_float32_adapter_once_until_it_changes():
    norm = torch.nn.LayerNorm(4)
    call = CastCall(norm, torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        first = call(x)
        kept = list(call._kept)
        again = call(x)
    assert all(a is b for a, b in zip(kept, call._kept))  # no new cast: the same tensors
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # an in-place change (optimizer step, hot-swap, load) bumps the version
        changed = call(x)
    assert not any(a is b for a, b in zip(kept, call._kept))
    torch.testing.assert_close(
        changed, torch.nn.functional.layer_norm(x, (4,), norm.weight.bfloat16(), norm.bias.bfloat16())
    )
    with torch.inference_mode():
        call(x)
    norm.weight.data = torch.ones(4)  # a new storage
    with torch.no_grad():
        torch.testing.assert_close(call(x), torch.nn.functional.layer_norm(x, (4,), None, norm.bias.bfloat16()))
    out = call(x.requires_grad_())  # with autograd: cast in the graph, gradients reach the float32 parameters
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
