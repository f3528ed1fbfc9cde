"""Many resident adapters: every operation and every mixed batch costs the same with 10 or 10,000.

Complexity is checked by counting the Python and C function calls an operation makes (deterministic,
unlike wall-clock time): the count must not change when more adapters are resident.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from conftest import make_inputs, make_tiny_model

import lntune.modules_to_save
from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model, mixed_batch


def count_calls(fn) -> int:
    """How many Python and C functions ``fn()`` calls (garbage collection paused)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    gc.disable()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def bert_with_adapters(count: int, perturb) -> PeftModel:
    """A tiny BERT classifier with ``count`` adapters ``a0``.. (LayerNorms and the classifier head)."""
    config = dict(task_type=TaskType.SEQ_CLS, target_modules=["LayerNorm"])
    model = get_peft_model(make_tiny_model("bert"), LNTuningConfig(**config), adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", LNTuningConfig(**config))
    for i in range(min(count, 8)):  # distinct weights for the adapters the batches use
        model.set_adapter(f"a{i}")
        perturb(model, scale=0.3, seed=i + 1)
    model.set_adapter("a0")
    return model.eval()


def operations(model: PeftModel, folder: str, count: int):
    """The per-adapter operations, each as a zero-argument function, on a model with ``count`` adapters."""
    config = dict(task_type=TaskType.SEQ_CLS, target_modules=["LayerNorm"])
    inputs = make_inputs("bert", batch=8)
    names = [f"a{i}" for i in range(8)]

    def mixed_forward():
        with torch.no_grad():
            model(**inputs, adapter_names=names)

    def mixed_train_step():  # (model.train() and eval() visit every module, copies included: not timed here)
        model(**inputs, adapter_names=names).logits.sum().backward()

    return {
        "add_adapter": lambda: model.add_adapter("new", LNTuningConfig(**config)),
        "set_adapter": lambda: model.set_adapter("new"),
        "set_adapter back": lambda: model.set_adapter("a0"),
        "delete_adapter": lambda: model.delete_adapter("new"),
        "load_adapter": lambda: model.load_adapter(folder, adapter_name="loaded"),
        "delete loaded": lambda: model.delete_adapter("loaded"),
        "mixed forward": mixed_forward,
        "mixed train step": mixed_train_step,
        "merge": model.merge_adapter,
        "unmerge": model.unmerge_adapter,
        "save one adapter": lambda: model.save_pretrained(f"{folder}-{count}", selected_adapters=["a1"]),
    }


def test_operation_cost_does_not_depend_on_the_number_of_adapters(tmp_path, perturb):
    folder = str(tmp_path / "adapter")
    bert_with_adapters(1, perturb).save_pretrained(folder)  # non-default names go into a subfolder
    folder += "/a0"
    counts = {}
    for count in (10, 40):
        model = bert_with_adapters(count, perturb)
        for op in operations(model, folder, count).values():  # warm up: first calls fill caches
            op()
        counts[count] = {name: count_calls(op) for name, op in operations(model, folder, count).items()}
    grew = {name: (counts[10][name], counts[40][name]) for name in counts[10] if counts[10][name] != counts[40][name]}
    assert not grew, f"calls with 10 and with 40 adapters resident: {grew}"


def test_classifier_heads_run_as_one_batched_matmul(perturb, monkeypatch):
    model = bert_with_adapters(4, perturb)
    inputs = make_inputs("bert", batch=8)
    names = ["a0", "a1", "a2", "a3", "a3", "a2", "__base__", "a0"]
    with torch.no_grad():
        expected = torch.cat(
            [_alone(model, name, {k: v[i : i + 1] for k, v in inputs.items()}).logits for i, name in enumerate(names)]
        )

    def no_grouping(*args, **kwargs):
        raise AssertionError("the classifier head ran one group per adapter")

    monkeypatch.setattr(lntune.modules_to_save, "grouped_forward", no_grouping)
    with torch.no_grad():
        out = model(**inputs, adapter_names=names).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _alone(model: PeftModel, name: str, inputs: dict):
    if name == "__base__":
        with model.disable_adapter():
            return model(**inputs)
    model.set_adapter(name)
    return model(**inputs)


NORMS = {"LayerNorm": lambda: torch.nn.LayerNorm(6), "RMSNorm": lambda: torch.nn.RMSNorm(6)}


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_per_sample_norms_and_heads_match_and_train_each_adapter(norm, bias, no_grad, perturb):
    """torch's norms and a Linear head: outputs equal each sample alone (without autograd the norm's affine
    runs in place); gradients reach each sample's adapter, also after an inference-mode forward."""
    mixed_batch.unit_affine.cache_clear()  # the first forward makes the identity affine the training one uses
    torch.manual_seed(0)
    model = torch.nn.Sequential(NORMS[norm](), torch.nn.Linear(6, 3, bias=bias))
    config = dict(target_modules=["0"], modules_to_save=["1"])
    peft_model = get_peft_model(model, LNTuningConfig(**config), adapter_name="a")
    peft_model.add_adapter("b", LNTuningConfig(**config))
    for seed, name in enumerate(["a", "b"]):
        peft_model.set_adapter(name)
        perturb(peft_model, scale=0.3, seed=seed)
    peft_model.set_requires_grad(["a", "b"], True)
    x = torch.randn(4, 5, 6)
    names = ["a", "b", "b", "a"]
    with no_grad():
        mixed_out = peft_model(x, adapter_names=names)
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            torch.testing.assert_close(mixed_out[i : i + 1], peft_model(x[i : i + 1]), atol=1e-5, rtol=0)
    peft_model.set_requires_grad(["a", "b"], True)
    peft_model(x.clone().requires_grad_(), adapter_names=names).pow(2).sum().backward()  # the norm saves its affine
    mixed = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad()
    for name in ("a", "b"):
        peft_model.set_adapter(name)
        peft_model.set_requires_grad(["a", "b"], True)
        rows = [i for i, n in enumerate(names) if n == name]
        peft_model(x[rows]).pow(2).sum().backward()
    assert mixed.keys() == {n for n, p in peft_model.named_parameters() if p.grad is not None}
    for n, p in peft_model.named_parameters():
        if n in mixed:
            torch.testing.assert_close(mixed[n], p.grad, atol=1e-5, rtol=1e-4)
