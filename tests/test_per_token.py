"""Per-token adapters: an adapter index per token (packed rows of continuous batching and packed training)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_tiny_model
from torch import nn
from transformers import DataCollatorWithFlattening
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lntune import LNTuningConfig, TaskType, get_peft_model
from lntune.collators import AdapterCollator
from lntune.mixed_batch import BatchAdapters


def _two_adapters(model: nn.Module, perturb, **config):
    peft = get_peft_model(model, LNTuningConfig(**config), adapter_name="a")
    peft.add_adapter("b", LNTuningConfig(**config))
    for seed, name in enumerate(["b", "a"]):
        peft.set_adapter(name)
        perturb(peft, scale=0.3, seed=seed + 1)
    return peft


def test_per_token_index_of_a_padded_batch_equals_per_sample(perturb):
    model = _two_adapters(make_tiny_model("llama"), perturb, task_type=TaskType.CAUSAL_LM)
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        per_sample = model(input_ids=ids, adapter_names=names).logits
        index = torch.arange(3).view(3, 1).expand(3, 6)
        per_token = model(input_ids=ids, adapter_names=names, adapter_token_index=index).logits
    torch.testing.assert_close(per_token, per_sample, atol=1e-6, rtol=0)


def test_each_token_runs_its_own_adapter_in_token_wise_modules(perturb):
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), LlamaRMSNorm(8))
    model = _two_adapters(net, perturb, target_modules=["1", "2", "3"])
    x = torch.randn(2, 5, 6)
    index = torch.tensor([[0, 1, 1, 0, 2], [2, 2, 1, 0, 0]])
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        out = model(x, adapter_names=names, adapter_token_index=index)
        for b in range(2):
            for t in range(5):
                alone = model(x[b : b + 1, t : t + 1], adapter_names=[names[index[b, t]]])
                torch.testing.assert_close(out[b : b + 1, t : t + 1], alone, atol=1e-6, rtol=0)
    layers = [m for m in model.modules() if hasattr(m, "mixed_batch_path")]
    assert [m.mixed_batch_path for m in layers] == ["per-sample", "grouped", "per-sample"]


def test_packed_sequences_train_each_their_own_adapter(perturb):
    """DataCollatorWithFlattening packs sequences of different adapters in one row; logits and gradients equal
    running each sequence alone with its adapter."""
    model = _two_adapters(make_tiny_model("llama"), perturb, task_type=TaskType.CAUSAL_LM)
    model.set_requires_grad(["a", "b"], True)
    model.train()
    g = torch.Generator().manual_seed(3)
    features = [
        {"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "adapter_name": name}
        for n, name in [(7, "a"), (5, "b"), (4, "a")]
    ]
    batch = AdapterCollator(DataCollatorWithFlattening())(features)
    assert batch["input_ids"].shape == (1, 16) and batch["adapter_names"] == ["a", "b", "a"]
    assert batch["adapter_token_index"].tolist() == [[0] * 7 + [1] * 5 + [2] * 4]
    packed = model(**batch, use_cache=False)
    packed.loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    start, total = 0, 0.0
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        alone = model(input_ids=ids, labels=ids, adapter_names=[feature["adapter_name"]], use_cache=False)
        n = ids.shape[1]
        torch.testing.assert_close(packed.logits[:, start : start + n], alone.logits, atol=1e-5, rtol=1e-5)
        total = total + alone.loss * (n - 1)  # the packed loss is the mean over every predicted token
        start += n
    (total / sum(len(f["input_ids"]) - 1 for f in features)).backward()
    assert all(grads[n].abs().sum() > 0 for n in grads)
    for n, p in params.items():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_a_head_that_sees_a_subset_of_the_tokens_is_refused_with_a_clear_error(perturb):
    model = _two_adapters(make_tiny_model("llama"), perturb, task_type=TaskType.CAUSAL_LM, modules_to_save=["lm_head"])
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "b"], adapter_token_index=index)  # every token reaches the head
        with pytest.raises(ValueError, match="sees a subset of the tokens"):
            model(input_ids=ids, adapter_names=["a", "b"], adapter_token_index=index, logits_to_keep=2)


def test_a_non_leaf_target_cannot_follow_per_token_adapters(perturb):
    model = _two_adapters(make_tiny_model("llama"), perturb, target_modules=["mlp"])
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(ValueError, match="not a leaf module"):
        model(input_ids=ids, adapter_names=["a", "b"], adapter_token_index=torch.tensor([[0, 1, 1, 0]]))


def test_bad_token_index_and_update():
    with pytest.raises(ValueError, match="index values"):
        BatchAdapters.from_token_index(["a"], torch.tensor([0, 1]))
    batch = BatchAdapters.from_token_index(["a", "b", "a"], torch.tensor([[0, 1, 2]]))
    assert batch.names == ["a", "b"] and batch.index.tolist() == [0, 1, 0]
    batch._cache["x"] = 1
    batch.update(["c"], torch.zeros(4, dtype=torch.long))
    assert batch.names == ["c"] and batch.index.numel() == 4 and not batch._cache
    model = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    with pytest.raises(ValueError, match="one entry per token"):
        model(
            input_ids=torch.ones(1, 4, dtype=torch.long), adapter_names=["default"], adapter_token_index=torch.zeros(3)
        )


def test_steps_of_the_same_adapters_keep_their_stacked_parameters(perturb):
    """Continuous batching updates one BatchAdapters per step: the modules and stacks of the same names are
    reused (no autograd), the gathered rows are not; new names or forget() drop what was kept."""
    net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
    model = _two_adapters(net, perturb, target_modules=["1"])
    tuner = model.base_model
    x = torch.randn(1, 5, 6)
    with torch.no_grad():
        alone = {name: model(x, adapter_names=[name]) for name in ["a", "b"]}
    with torch.no_grad(), tuner.batch_adapters(["a", "b"], token_index=torch.tensor([[0, 1, 1, 0, 1]])) as batch:
        model(x)
        kept = dict(batch._kept)
        assert any(key[0] == "stack" for key in kept)
        batch.update(["a", "b"], torch.tensor([1, 1, 0, 0, 0]))
        second = model(x)
        assert all(batch._kept[k] is v for k, v in kept.items())  # the same stacks, a new gather
        for t, name in enumerate("bbaaa"):
            torch.testing.assert_close(second[0, t], alone[name][0, t], atol=1e-6, rtol=0)
        layer = model.base_model.model[1]
        layer.tuned_module("a").weight.mul_(2.0)  # changed in place: kept stacks are stale until forget()
        batch.forget()
        third = model(x)
        assert not torch.allclose(third[0, 2], second[0, 2])
        batch.update(["b"], torch.zeros(5, dtype=torch.long))
        assert not any(key[0] == "stack" for key in batch._kept)
