"""The coupling to Transformers' continuous batching (`lntune.serve.continuous`): fails loudly when the engine changes.

It checks the engine internals lntune relies on, then runs requests of several adapters through the engine
(mixed adapters in one step, a prefill next to decodes, a prompt longer than one step, a request that joins
mid-flight) and compares each answer with ``generate`` on that adapter alone. The step statistics make sure
the comparison is not vacuous.
"""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch
import transformers
from test_serve import make_adapters, tiny_model

from lntune import PeftModel
from lntune.serve import continuous
from lntune.serve.errors import APIError
from lntune.serve.generation import GenerationEngine, GenerationSettings

ADAPTERS = ["x", "y", "z"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continuous")
    llama = tiny_model(tmp / "llama", "llama")
    adapters = make_adapters(llama, "CAUSAL_LM", tmp / "adapters", ADAPTERS, seed=21)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    return base, adapters


def _engine(base, adapters, max_batch_tokens=8, max_requests=8):
    model = copy.deepcopy(base)
    peft = PeftModel.from_pretrained(model, adapters["x"], "x")
    for name in ADAPTERS[1:]:
        peft.load_adapter(adapters[name], name)
    settings = GenerationSettings(max_batch_tokens=max_batch_tokens, max_requests=max_requests, cache_tokens=2048)
    return GenerationEngine(model, lambda: peft.base_model, settings, [base.config.eos_token_id], 0)


def _reference(base, adapters, adapter, prompt, max_tokens):
    model = base if adapter == "__base__" else PeftModel.from_pretrained(copy.deepcopy(base), adapters[adapter])
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    new = out[0, len(prompt) :].tolist()
    eos = base.config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def _collect(engine, prompt, adapter, max_tokens):
    async def run():
        tokens = []
        async for completion in engine.generate(prompt, adapter, max_tokens, 0.0, 1.0):
            tokens = completion.tokens
        return tokens

    return run()


def test_the_engine_has_what_lntune_relies_on():
    assert continuous.engine_problems() == []
    assert continuous.adapter_of(continuous.request_id("abc", "a3")) == "a3"
    assert continuous.adapter_of("abc@a3__child#1") == "a3"  # a forked request keeps its parent's adapter
    assert continuous.adapter_of("abc@__base____child#0") == "__base__"
    assert continuous.adapter_of("__warmup_DECODING_0__") == "__base__"
    with pytest.raises(KeyError):
        continuous.adapter_of("no-adapter")


def test_requests_of_several_adapters_equal_generate_each(setup):
    base, adapters = setup
    engine = _engine(base, adapters)
    g = torch.Generator().manual_seed(4)
    jobs = [
        ("x", torch.randint(5, 900, (5,), generator=g).tolist(), 12, 0.0),
        ("y", torch.randint(5, 900, (19,), generator=g).tolist(), 6, 0.0),  # longer than one step: split prefill
        ("z", torch.randint(5, 900, (3,), generator=g).tolist(), 15, 0.0),
        ("__base__", torch.randint(5, 900, (7,), generator=g).tolist(), 9, 0.0),
        ("y", torch.randint(5, 900, (4,), generator=g).tolist(), 10, 0.25),  # joins mid-flight
    ]

    async def main():
        async def later(adapter, prompt, n, delay):
            await asyncio.sleep(delay)
            return await _collect(engine, prompt, adapter, n)

        return await asyncio.gather(*(later(*job) for job in jobs))

    engine.start()
    try:
        results = asyncio.run(main())
        assert engine.manager.batch_processor.cache.use_prefix_sharing is False  # never share KV across adapters
    finally:
        engine.stop()
    expected = [_reference(base, adapters, adapter, prompt, n) for adapter, prompt, n, _ in jobs]
    assert results == expected
    assert len({tuple(r) for r in results}) == len(results), "the adapters should change the answers"
    stats = engine.router.stats
    assert stats.max_adapters_in_step >= 3, "no step mixed adapters: the comparison proves nothing"
    assert stats.mixed_prefill_decode_steps >= 1
    assert threading.main_thread().name not in stats.threads


def test_an_unrouted_engine_forward_fails_instead_of_running_the_wrong_adapter(setup):
    base, adapters = setup
    engine = _engine(base, adapters)
    engine.start()
    try:
        runner = engine.manager.batch_processor.model_runner
        runner.compute_batch = runner._lntune_compute_batch  # as if the engine stopped calling the routed method
        with pytest.raises(APIError, match="without a per-token adapter index"):
            asyncio.run(_collect(engine, [5, 6, 7], "y", 4))
    finally:
        engine.stop()


def test_leaving_a_request_early_cancels_it_in_the_engine(setup):
    base, adapters = setup
    engine = _engine(base, adapters)

    async def main():
        generation = engine.generate([5, 6, 7, 8], "z", 500, 0.9, 1.0)
        async for completion in generation:
            if len(completion.tokens) >= 3:
                break
        await generation.aclose()
        return continuous.pending_requests(engine.manager)

    engine.start()
    try:
        assert asyncio.run(main()) == []  # cancelled, and its result handler gone
        assert asyncio.run(_collect(engine, [5, 6, 7], "x", 3)) == _reference(base, adapters, "x", [5, 6, 7], 3)
    finally:
        engine.stop()
