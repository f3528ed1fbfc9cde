"""Mixed-adapter batches: ``adapter_names=[...]`` runs every sample through its own adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_tiny_model, model_output

from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model
from lntune.layer import LNTuningLayer

NAMES = ["a", "b", "__base__", "a"]
TASKS = {"llama": TaskType.CAUSAL_LM, "gpt2": TaskType.CAUSAL_LM, "bert": TaskType.SEQ_CLS, "t5": TaskType.SEQ_2_SEQ_LM}


def _two_adapters(kind: str, perturb, **config) -> PeftModel:
    """Adapters "a" and "b" on ``kind``, each perturbed differently; "a" active."""
    config.setdefault("task_type", TASKS.get(kind))
    model = get_peft_model(make_tiny_model(kind), LNTuningConfig(**config), adapter_name="a")
    model.add_adapter("b", LNTuningConfig(**config))
    for seed, name in enumerate(["b", "a"]):
        model.set_adapter(name)
        perturb(model, scale=0.2, seed=seed + 1)
    return model


def _sample(inputs: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in inputs.items()}


def _alone(model: PeftModel, name: str, run, *args, **kwargs):
    """``run(*args, **kwargs)`` with only ``name``'s adapter active (the base model for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return run(*args, **kwargs)
    model.set_adapter(name)
    return run(*args, **kwargs)


def _assert_rows_match(model: PeftModel, kind: str, names=NAMES) -> None:
    inputs = make_inputs(kind, batch=len(names))
    with torch.no_grad():
        # Two calls: the first decides the path of each norm class (once per class), the second reuses it.
        first = model_output(model, {**inputs, "adapter_names": names})
        mixed = model_output(model, {**inputs, "adapter_names": names})
        for i, name in enumerate(names):
            alone = _alone(model, name, model_output, model, _sample(inputs, i))
            torch.testing.assert_close(first[i : i + 1], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5"])
def test_each_sample_runs_its_own_adapter(kind, perturb):
    model = _two_adapters(kind, perturb)
    _assert_rows_match(model, kind)
    assert all(m._batch_adapters is None for _, m in model.base_model.tuner_modules())
    # Every norm of these models (LlamaRMSNorm and T5LayerNorm included) applies per-sample weights in one call.
    assert all(layer.mixed_batch_path == "per-sample" for layer in model.modules() if isinstance(layer, LNTuningLayer))


def test_linear_target_and_modules_to_save_use_the_grouped_path(perturb):
    model = _two_adapters("bert", perturb, target_modules=["LayerNorm", "intermediate.dense"])
    assert model.base_model.model.classifier.modules_to_save.keys() == {"a", "b"}
    _assert_rows_match(model, "bert")


def test_gradients_of_a_mixed_batch_are_the_sums_of_per_adapter_gradients(perturb):
    model = _two_adapters("llama", perturb)
    model.train()
    inputs = make_inputs("llama", batch=len(NAMES))

    def loss_of(batch: dict, **kwargs) -> torch.Tensor:
        return model(**batch, **kwargs).logits.float().pow(2).sum()

    params = {n: p for n, p in model.named_parameters() if "ln_tuning_layers" in n}
    model.set_requires_grad(["a", "b"], True)
    loss_of(inputs, adapter_names=NAMES).backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    assert all(g.abs().sum() > 0 for g in mixed.values())

    model.zero_grad()
    for name in ["a", "b"]:
        rows = [i for i, n in enumerate(NAMES) if n == name]
        model.set_adapter(name)
        loss_of({k: v[rows] for k, v in inputs.items()}).backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4)


def test_generate_with_adapter_names(perturb):
    model = _two_adapters("llama", perturb)
    inputs = make_inputs("llama", batch=len(NAMES), seq=5)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(**inputs, adapter_names=NAMES, **options)
    for i, name in enumerate(NAMES):
        alone = _alone(model, name, model.generate, **_sample(inputs, i), **options)
        assert torch.equal(out[i : i + 1], alone)


def test_bfloat16_mixed_batch_with_float32_adapters(perturb):
    model = get_peft_model(make_tiny_model("llama").to(torch.bfloat16), LNTuningConfig(), adapter_name="a")
    model.add_adapter("b", LNTuningConfig())
    model.set_adapter("b")
    perturb(model, scale=0.2)
    inputs = make_inputs("llama", batch=len(NAMES))
    with torch.no_grad():
        out = model_output(model, {**inputs, "adapter_names": NAMES})
        assert out.dtype == torch.bfloat16
        alone = _alone(model, "b", model_output, model, _sample(inputs, 1))
    torch.testing.assert_close(out[1:2], alone, atol=0.05, rtol=0.02)


def test_wrong_length_unknown_names_and_merged_are_refused(perturb):
    model = _two_adapters("llama", perturb)
    inputs = make_inputs("llama", batch=4)
    with pytest.raises(ValueError, match="adapter_names has 2 entries, but the batch has 4 samples"):
        model(**inputs, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        model(**inputs, adapter_names="a")
    with pytest.raises(ValueError, match="Adapter nope not found"):
        model(**inputs, adapter_names=["a", "b", "nope", "a"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries"):
        model.generate(**inputs, adapter_names=["a", "b", "a"], max_new_tokens=2)
    model.merge_adapter()
    with pytest.raises(ValueError, match="while an adapter is merged"):
        model(**inputs, adapter_names=NAMES)
    layers = [m for m in model.modules() if isinstance(m, LNTuningLayer)]
    assert all(layer._batch_adapters is None for layer in layers)


def test_training_a_mixed_batch_with_gradient_checkpointing_is_refused(perturb):
    model = _two_adapters("llama", perturb)
    model.base_model.model.gradient_checkpointing_enable()
    inputs = make_inputs("llama", batch=len(NAMES))
    with torch.no_grad():
        model(**inputs, adapter_names=NAMES)  # inference recomputes nothing: allowed
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**inputs, adapter_names=NAMES)


class FlatWeightNorm(torch.nn.Module):
    """A norm whose forward cannot take per-sample weights (F.layer_norm wants one weight of the normalised shape)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.bias = torch.nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias)


def test_a_norm_class_that_cannot_take_per_sample_weights_runs_grouped_with_one_warning(perturb):
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), FlatWeightNorm(8), torch.nn.Linear(8, 3), FlatWeightNorm(3))
    model = get_peft_model(net, LNTuningConfig(target_modules=["1", "3"]), adapter_name="a")
    model.add_adapter("b", LNTuningConfig(target_modules=["1", "3"]))
    for seed, name in enumerate(["b", "a"]):
        model.set_adapter(name)
        perturb(model, scale=0.3, seed=seed + 1)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="FlatWeightNorm does not compute per-sample weights") as record:
        mixed = model(x, adapter_names=NAMES)
    assert sum("FlatWeightNorm" in str(w.message) for w in record) == 1  # once per class, not per layer or call
    layers = [m for m in model.modules() if isinstance(m, LNTuningLayer)]
    assert [layer.mixed_batch_path for layer in layers] == ["grouped", "grouped"]
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, name, model, x[i : i + 1]), atol=1e-6, rtol=0)


def test_the_path_follows_the_class_not_the_dtype_or_the_batch(perturb):
    model = _two_adapters("llama", perturb).to(torch.bfloat16)
    inputs = make_inputs("llama", batch=len(NAMES))
    with torch.no_grad():
        model(**inputs, adapter_names=NAMES)  # bf16 rounding never moves a class to the grouped path
    assert {m.mixed_batch_path for m in model.modules() if isinstance(m, LNTuningLayer)} == {"per-sample"}
