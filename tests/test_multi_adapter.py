"""Many adapters trained together: heads of their own sizes in one batch, bulk adding, the loss and the optimizer."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from conftest import VOCAB, make_inputs, make_tiny_model
from test_many_adapters import count_calls
from torch import nn
from transformers import DataCollatorWithPadding

import lntune.modules_to_save
from lntune import LNTuningConfig, PeftModel, TaskType, get_peft_model
from lntune.checkpoint import CheckpointError
from lntune.collators import AdapterCollator
from lntune.mixed_batch import BatchAdapters
from lntune.modules_to_save import ModulesToSaveWrapper
from lntune.multi_adapter import AdapterAdamW, AdapterBatchSampler, adapter_cross_entropy, adapter_parameters

SIZES = {"two": 2, "five": 5, "three": 3}  # the tiny BERT's own head has 3 classes


def _config() -> LNTuningConfig:
    return LNTuningConfig(task_type=TaskType.SEQ_CLS)


def _ragged(perturb, sizes=SIZES) -> PeftModel:
    """A tiny BERT classifier with one adapter per entry of ``sizes`` (its number of classes), each perturbed."""
    names = list(sizes)
    torch.manual_seed(0)  # the new heads' initialisation
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name=names[0])
    model.base_model.model.classifier.set_head_size(names[0], sizes[names[0]])
    model.add_adapters(names[1:], _config(), num_labels=[sizes[n] for n in names[1:]])
    for seed, name in enumerate(names):
        model.set_adapter(name)
        perturb(model, scale=0.3, seed=seed + 1)
    return model.eval()


def _head(model: PeftModel) -> ModulesToSaveWrapper:
    return model.base_model.model.classifier


def _labels(names: list[str], sizes=SIZES) -> torch.Tensor:
    return torch.tensor([(3 * i + 1) % sizes[n] for i, n in enumerate(names)])


def test_heads_of_different_sizes_run_in_one_batched_matmul_as_each_alone(perturb, monkeypatch):
    model = _ragged(perturb)
    assert {n: _head(model).head_size(n) for n in SIZES} == SIZES
    names = ["two", "five", "three", "five", "__base__", "two"]
    inputs = make_inputs("bert", batch=len(names))

    def no_grouping(*args, **kwargs):
        raise AssertionError("the heads ran one group per adapter")

    monkeypatch.setattr(lntune.modules_to_save, "grouped_forward", no_grouping)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    assert mixed.shape == (6, 5)
    for i, name in enumerate(names):
        sample = {k: v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(**sample).logits
            else:
                model.set_adapter(name)
                alone = model(**sample).logits
        width = alone.shape[1]
        torch.testing.assert_close(mixed[i : i + 1, :width], alone, atol=1e-5, rtol=0)
        assert (mixed[i, width:] == torch.finfo(mixed.dtype).min).all()  # padded: the most negative finite value
    probabilities = mixed.softmax(-1)
    assert torch.isfinite(probabilities).all() and (probabilities[0, 2:] == 0).all()


def test_gradients_of_a_ragged_batch_equal_each_adapter_alone(perturb):
    model = _ragged(perturb)
    model.set_requires_grad(list(SIZES), True)
    names = ["two", "five", "three", "five", "two", "three"]
    inputs, labels = make_inputs("bert", batch=len(names)), _labels(names)
    loss = adapter_cross_entropy(model(**inputs, adapter_names=names).logits, labels, scale=len(names))
    assert torch.isfinite(loss)
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mixed = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    for name in SIZES:
        rows = [i for i, n in enumerate(names) if n == name]
        sample = {k: v[rows] for k, v in inputs.items()}
        logits = model(**sample, adapter_names=[name] * len(rows)).logits
        assert logits.shape[1] == SIZES[name]
        torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum").div(len(names)).backward()
    for n, p in params.items():
        torch.testing.assert_close(mixed[n], p.grad, atol=1e-6, rtol=1e-4)
    assert all(mixed[n].abs().sum() > 0 for n in params)


class _TwoLayerHead(nn.Module):
    """A RoBERTa-style head (dense, then out_proj): not a plain Linear, so mixed batches group it."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.out_proj = nn.Linear(4, 3)

    def forward(self, x):
        return self.out_proj(torch.tanh(self.dense(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grouped_path_pads_heads_of_other_sizes_too(dtype):
    torch.manual_seed(0)
    wrapper = ModulesToSaveWrapper(_TwoLayerHead(), "a")
    for name, size in (("b", 6), ("c", 2)):
        wrapper.update_layer(name)
        wrapper.set_head_size(name, size)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            for p in wrapper.tuned_module(name).parameters():
                p.add_(torch.randn(p.shape))
    wrapper.to(dtype)
    names = ["c", "a", "b", "c"]
    x = torch.randn(4, 4, dtype=dtype)
    wrapper.set_batch_adapters(BatchAdapters.from_names(names))
    with torch.no_grad():
        out = wrapper(x)
    wrapper.set_batch_adapters(None)
    assert out.shape == (4, 6) and out.dtype == dtype and torch.isfinite(out.float().softmax(-1)).all()
    for i, name in enumerate(names):
        alone = wrapper.tuned_module(name)(x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1, : alone.shape[1]], alone)
        assert (out[i, alone.shape[1] :] == torch.finfo(dtype).min).all()


def test_an_adapter_with_another_head_size_saves_and_loads_with_its_own_head(tmp_path, perturb):
    model = _ragged(perturb)
    model.save_pretrained(tmp_path, selected_adapters=["five", "two"])
    inputs = make_inputs("bert", batch=2)
    with torch.no_grad():
        model.set_adapter("five")
        expected = model(**inputs).logits
    assert expected.shape == (2, 5)
    # load_adapter onto a model whose own head has 3 classes: the copy takes the file's 5
    other = get_peft_model(make_tiny_model("bert"), _config(), adapter_name="x")
    other.load_adapter(tmp_path / "five", adapter_name="five")
    other.set_adapter("five")
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).logits, expected)
    # from_pretrained likewise
    loaded = PeftModel.from_pretrained(make_tiny_model("bert"), tmp_path / "two")
    with torch.no_grad():
        model.set_adapter("two")
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    # the model's own loss would reshape by config.num_labels: refused with labels, named
    with pytest.raises(ValueError, match="'five' has a head of 5 classes.*adapter_cross_entropy"):
        other(**inputs, labels=torch.tensor([0, 1]))


def test_loading_a_head_that_does_not_fit_changes_nothing(tmp_path, perturb):
    from safetensors.torch import load_file, save_file

    _ragged(perturb).save_pretrained(tmp_path, selected_adapters=["five"])
    tensors = load_file(tmp_path / "five" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[key] = torch.zeros(5, 7)  # another hidden size: not this model's head
    save_file(tensors, tmp_path / "five" / "adapter_model.safetensors", metadata={"format": "pt"})
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name="x")
    with pytest.raises(
        CheckpointError, match=r"five.adapter_model.safetensors: Shape mismatch for '.*classifier\.(weight|bias)'"
    ):
        model.load_adapter(tmp_path / "five", adapter_name="five")
    assert (
        list(model.peft_config) == ["x"] and not _head(model).has_adapter("five") and not _head(model).resized_heads()
    )


def _add_cost(resident: int) -> int:
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name="r0")
    model.add_adapters([f"r{i}" for i in range(1, resident)], _config())
    model.add_adapters(["w0", "w1"], _config(), num_labels=[4, 7])  # warm-up
    calls = count_calls(lambda: model.add_adapters(["n0", "n1", "n2"], _config(), num_labels=[2, 5, 3]))
    assert [_head(model).head_size(n) for n in ("n0", "n1", "n2")] == [2, 5, 3]
    assert model.peft_config["n0"] is not model.peft_config["n1"]  # each adapter its own config
    return calls


def test_add_adapters_costs_the_same_with_10_or_40_adapters_resident():
    assert _add_cost(10) == _add_cost(40)


def test_add_adapters_is_all_or_nothing_and_checks_num_labels():
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name="a")
    for names, sizes, message in [
        (["b", "b"], None, "distinct"),
        (["b", "a"], None, "already exists"),
        (["b", "c.d"], None, "Invalid adapter name"),
        (["b", "c"], [2], "2 adapters"),
        (["b", "c"], [2, 0], "at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.add_adapters(names, _config(), num_labels=sizes)
        assert list(model.peft_config) == ["a"] and set(_head(model)._copies) == {"a"}
    lm = get_peft_model(make_tiny_model("llama"), LNTuningConfig(task_type=TaskType.CAUSAL_LM))
    with pytest.raises(ValueError, match="num_labels needs a classification model"):
        lm.add_adapter("b", LNTuningConfig(task_type=TaskType.CAUSAL_LM), num_labels=3)


def test_add_adapter_with_num_labels_and_weighted_adapters_of_one_size(perturb):
    model = _ragged(perturb)
    config = _config()
    model.add_adapter("five-b", config, num_labels=5)
    assert model.peft_config["five-b"] is config and _head(model).head_size("five-b") == 5
    model.add_weighted_adapter(["five", "five-b"], [0.5, 0.5], "mean")
    assert _head(model).head_size("mean") == 5
    with pytest.raises(ValueError, match="different sizes"):
        model.add_weighted_adapter(["five", "two"], [0.5, 0.5], "bad")
    merged = model.merge_and_unload(adapter_names=["five"])
    assert merged.config.num_labels == 5 and merged.classifier.out_features == 5


def test_the_collator_passes_each_examples_adapter():
    from lntune.loading import load_tokenizer, packaged_model_path

    collate = AdapterCollator(DataCollatorWithPadding(load_tokenizer(packaged_model_path())))
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": 1, "adapter_name": "a"},
            {"input_ids": [8], "labels": 4, "adapter_name": "b"},
        ]
    )
    assert batch["adapter_names"] == ["a", "b"] and batch["labels"].tolist() == [1, 4]
    assert batch["input_ids"].shape == (2, 3) and "adapter_name" not in batch
    with pytest.raises(KeyError, match="example 1 of the batch has no 'adapter_name'"):
        collate([{"input_ids": [5], "adapter_name": "a"}, {"input_ids": [6]}])


def _examples(names: list[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(names), 6), generator=g)
    return ids, torch.arange(len(names)) % 2  # a class every head has


def test_adapters_trained_together_make_the_updates_of_their_own_runs(perturb):
    """Two adapters (2 and 5 classes) in mixed batches of 4, each stepping per 4 of its own examples, end
    equal to each trained alone in batches of 4 with the same schedule and clipping."""
    sizes = {"two": 2, "five": 5}
    order = ["two", "two", "five", "five"] * 4  # each mixed batch of 4 holds 2 of each adapter
    ids, labels = _examples(order)
    labels = torch.tensor([i % sizes[n] for i, n in enumerate(order)])
    schedule = {"two": lambda k: 1 - k / 4, "five": lambda k: 1 - k / 4}

    def build():
        return _ragged(perturb, sizes).eval()  # eval: no dropout, so both runs see the same forward

    together = build()
    optimizer = AdapterAdamW(
        together,
        list(sizes),
        lr=0.05,
        batch_size=4,
        lr_lambda=lambda name, k: schedule[name](k),
        max_grad_norm=0.5,
        total_steps=4,
    )
    for step in range(4):
        rows = slice(4 * step, 4 * step + 4)
        names = order[rows]
        logits = together(input_ids=ids[rows], adapter_names=names).logits
        adapter_cross_entropy(logits, labels[rows], scale=4).backward()
        optimizer.add_batch(names)
        optimizer.step()
        together.zero_grad()
    assert optimizer.adapter_steps() == {"two": 2, "five": 2} and not optimizer.pending()

    alone = build()
    for name in sizes:
        params = adapter_parameters(alone, [name])[name]
        alone.set_requires_grad([name], True)
        single = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
        rows = [i for i, n in enumerate(order) if n == name]
        for k in range(2):
            batch = rows[4 * k : 4 * k + 4]
            for group in single.param_groups:
                group["lr"] = 0.05 * schedule[name](k)
            logits = alone(input_ids=ids[batch], adapter_names=[name] * 4).logits
            torch.nn.functional.cross_entropy(logits, labels[batch]).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            single.step()
            single.zero_grad()
    mine, theirs = adapter_parameters(together, list(sizes)), adapter_parameters(alone, list(sizes))
    for name in sizes:
        for a, b in zip(mine[name], theirs[name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_optimizer_holds_the_state_of_the_adapters_that_trained_only(perturb):
    names = [f"c{i}" for i in range(12)]
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name=names[0])
    model.add_adapters(names[1:], _config(), num_labels=[2, 5, 3] * 3 + [2, 5])
    optimizer = AdapterAdamW(model, names, lr=1e-2, batch_size=2)
    per_adapter = {
        n: sum(p.numel() * p.element_size() for p in ps) for n, ps in adapter_parameters(model, names).items()
    }
    assert optimizer.state_bytes() == 0
    batch = names[:4] * 2  # four adapters, two examples each: each steps once
    ids, _ = _examples(batch)
    labels = torch.zeros(len(batch), dtype=torch.long)
    adapter_cross_entropy(model(input_ids=ids, adapter_names=batch).logits, labels, scale=2).backward()
    optimizer.add_batch(batch)
    optimizer.step()
    moments = [t for s in optimizer.state.values() for t in s.values() if t.dim()]
    assert len(moments) == 2 * sum(len(ps) for ps in adapter_parameters(model, names[:4]).values())
    assert optimizer.state_bytes() == 2 * sum(per_adapter[n] for n in names[:4])  # exp_avg and exp_avg_sq
    assert all(p.grad is None for ps in adapter_parameters(model, names).values() for p in ps)


def _step_cost(resident: int) -> int:
    names = [f"c{i}" for i in range(resident)]
    model = get_peft_model(make_tiny_model("bert"), _config(), adapter_name=names[0])
    model.add_adapters(names[1:], _config())
    optimizer = AdapterAdamW(model, names, lr=1e-2, batch_size=2, max_grad_norm=1.0, lr_lambda=lambda n, k: 1.0)
    batch = names[:3] * 2
    ids, labels = _examples(batch)

    def step():
        adapter_cross_entropy(model(input_ids=ids, adapter_names=batch).logits, labels, scale=2).backward()
        optimizer.add_batch(batch)
        optimizer.step()

    step()  # warm-up: the first step creates AdamW's state
    return count_calls(step)


def test_an_optimizer_step_costs_the_same_with_10_or_40_adapters():
    assert _step_cost(10) == _step_cost(40)


def test_accumulated_gradients_survive_a_state_dict_round_trip(perturb):
    sizes = {"two": 2, "five": 5}
    models = [_ragged(perturb, sizes).eval() for _ in range(2)]
    optimizers = [AdapterAdamW(m, list(sizes), lr=0.05, batch_size=4, total_steps=10) for m in models]
    order = ["two", "five", "five", "two", "two", "five"]
    ids, labels = _examples(order)

    def train(model, optimizer, rows):
        names = [order[i] for i in rows]
        adapter_cross_entropy(model(input_ids=ids[rows], adapter_names=names).logits, labels[rows], scale=4).backward()
        optimizer.add_batch(names)
        optimizer.step()

    for model, optimizer in zip(models, optimizers):
        train(model, optimizer, [0, 1, 2])  # 1 and 2 examples pending: nothing steps
    assert optimizers[0].pending() == {"two": 1, "five": 2} and not optimizers[0].adapter_steps()
    state = optimizers[0].state_dict()
    fresh = AdapterAdamW(models[0], list(sizes), lr=0.05, batch_size=4, total_steps=10)
    fresh.load_state_dict(state)
    train(models[0], fresh, [3, 4, 5])
    fresh.flush()
    train(models[1], optimizers[1], [3, 4, 5])
    optimizers[1].flush()
    assert fresh.adapter_steps() == optimizers[1].adapter_steps() == {"two": 1, "five": 1}
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_end_epoch_steps_what_is_pending_and_counts_the_next_epoch_from_zero(perturb):
    """Repeated examples at an epoch's end (accelerate's filling of the last global batch under DDP) step at
    that end and do not shift the next epoch's step boundaries."""
    sizes = {"two": 2, "five": 5}
    model = _ragged(perturb, sizes).train()
    optimizer = AdapterAdamW(model, list(sizes), lr=0.05, batch_size=4, epoch_examples={"two": 3, "five": 4})

    def batch(names):
        for group in adapter_parameters(model, list(sizes)).values():
            for p in group:
                p.grad = torch.ones_like(p)
        optimizer.add_batch(names)
        optimizer.step()

    batch(["five"] * 4)  # "five"'s epoch: one full run, it steps
    batch(["two"] * 3 + ["five"])  # "two"'s epoch ends (it steps); one repeated "five" example is pending
    assert optimizer.adapter_steps() == {"five": 1, "two": 1} and optimizer.pending() == {"five": 1}
    optimizer.end_epoch()
    assert optimizer.adapter_steps() == {"five": 2, "two": 1} and not optimizer.pending()
    batch(["five"] * 4)  # the next epoch's first run of "five" steps on its own four examples
    assert optimizer.adapter_steps() == {"five": 3, "two": 1} and not optimizer.pending()


def test_an_optimizer_state_of_other_adapters_is_refused_before_anything_loads(perturb):
    model = _ragged(perturb)
    trained = AdapterAdamW(model, ["two", "five"], lr=0.05)
    adapter_cross_entropy(
        model(input_ids=torch.tensor([[5, 6, 7]]), adapter_names=["two"]).logits, torch.tensor([1])
    ).backward()
    trained.add_batch(["two"])
    trained.step()
    other = AdapterAdamW(model, ["five", "two"], lr=0.05)
    with pytest.raises(ValueError, match="another list of adapters"):
        other.load_state_dict(trained.state_dict())
    assert not other.state  # no AdamW moments were taken from the refused state


def test_adapter_cross_entropy_ignores_padded_classes():
    logits = torch.tensor([[1.0, 2.0, torch.finfo(torch.float32).min], [0.5, -1.0, 3.0]])
    labels = torch.tensor([1, 2])
    expected = (
        torch.nn.functional.cross_entropy(logits[:1, :2], labels[:1], reduction="sum")
        + torch.nn.functional.cross_entropy(logits[1:], labels[1:], reduction="sum")
    ) / 2
    torch.testing.assert_close(adapter_cross_entropy(logits, labels), expected)
    assert math.isclose(float(adapter_cross_entropy(logits, labels, scale=4)), float(expected) / 2, rel_tol=1e-6)


def test_the_sampler_gives_each_adapter_runs_of_its_batch_size_in_a_new_order_each_epoch():
    adapters = ["a"] * 5 + ["b"] * 9 + ["c"] * 16 + ["d"] * 2
    sampler = AdapterBatchSampler(adapters, batch_size=4, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(adapters))) and order == list(sampler)  # each once, deterministic
        runs = []  # consecutive examples of one adapter, cut every 4 of its own
        for i in order:
            if runs and runs[-1][0] == adapters[i] and len(runs[-1][1]) < 4:
                runs[-1][1].append(i)
            else:
                runs.append((adapters[i], [i]))
        sizes = {name: [len(r) for n, r in runs if n == name] for name in "abcd"}
        assert sizes == {"a": [4, 1], "b": [4, 4, 1], "c": [4, 4, 4, 4], "d": [2]}  # the short run last
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_no_batch_of_the_samplers_order_holds_two_runs_of_one_adapter():
    """On 300 random configurations, each adapter's examples in each batch belong to one of its runs, so that
    it steps ceil(n / batch) times an epoch, each on one run."""
    rng = random.Random(1)
    for trial in range(300):
        batch = rng.choice([1, 2, 3, 4, 8, 16, 32])
        sizes = {f"x{i}": rng.randint(1, 300) for i in range(rng.randint(1, 30))}
        adapters = [name for name, n in sizes.items() for _ in range(n)]
        order = AdapterBatchSampler(adapters, batch, seed=trial).order()
        pending, seen, steps = Counter(), Counter(), Counter()
        for start in range(0, len(order), batch):
            for name, count in Counter(adapters[i] for i in order[start : start + batch]).items():
                pending[name] += count
                seen[name] += count
                assert pending[name] <= batch, (trial, name)  # else two runs would share this batch's gradient
                if pending[name] == batch or seen[name] == sizes[name]:
                    steps[name] += 1
                    pending[name] = 0
        assert steps == {name: math.ceil(n / batch) for name, n in sizes.items()}, trial


def test_any_prefix_of_the_samplers_order_holds_about_every_adapters_share():
    """Half an epoch (--epochs 0.5, --max-steps) trains every adapter on about half of its examples, within a
    batch, instead of the largest adapters first."""
    adapters = ["big"] * 100 + ["mid"] * 30 + ["small"] * 10 + ["tiny"] * 4
    for seed in range(5):
        order = AdapterBatchSampler(adapters, batch_size=10, seed=seed).order()
        half = Counter(adapters[i] for i in order[: len(order) // 2])
        for name, n in Counter(adapters).items():
            if n > 10:
                assert abs(half[name] - n / 2) <= 10, (seed, dict(half))


def test_in_the_samplers_order_each_adapter_makes_the_steps_of_its_own_run():
    """3 adapters of 5, 9 and 16 examples, batch 4, 2 epochs: 2 x 2, 2 x 3 and 2 x 4 steps, nothing left over."""
    counts = {"two": 5, "five": 9, "three": 16}
    model = _ragged(lambda *a, **k: None, SIZES).eval()
    adapters = [name for name, n in counts.items() for _ in range(n)]
    ids, labels = _examples(adapters)
    total = 2 * math.ceil(len(adapters) / 4)
    optimizer = AdapterAdamW(model, list(counts), lr=0.01, batch_size=4, epoch_examples=counts, total_steps=total)
    sampler = AdapterBatchSampler(adapters, batch_size=4, seed=0)
    taken = {name: [] for name in counts}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), 4):
            rows = order[start : start + 4]
            names = [adapters[i] for i in rows]
            logits = model(input_ids=ids[rows], adapter_names=names).logits
            adapter_cross_entropy(logits, labels[rows], scale=4).backward()
            before = optimizer.adapter_steps()
            optimizer.add_batch(names)
            optimizer.step()
            for name, steps in optimizer.adapter_steps().items():
                if steps != before.get(name, 0):
                    taken[name].append(start)
    assert optimizer.adapter_steps() == {"two": 4, "five": 6, "three": 8} and not optimizer.pending()


def test_train_eval_and_zero_grad_reach_every_module_and_parameter(perturb):
    """The wrappers' train() and PeftModel.zero_grad() skip a call per copy: the result must be torch's."""
    model = _ragged(perturb)
    modules = list(model.modules())
    for mode in (True, False, True):
        for i, module in enumerate(modules):  # scramble every flag first
            module.training = bool(i % 2) != mode
        assert model.train(mode) is model
        assert all(m.training == mode for m in modules)
    params = list(model.parameters())
    assert len(params) > 30 and any(not p.requires_grad for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    model.zero_grad()
    assert all(p.grad is None for p in params)
