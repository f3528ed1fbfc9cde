"""Transformers' continuous batching with one lntune adapter per request: the one module that reads the engine's
internals (``transformers.generation.continuous_batching``).

Transformers' `ContinuousBatchingManager` packs every scheduled request into one row ``(1, T)`` per step. lntune
tells the norm layers which adapter each packed token uses (a per-token `lntune.mixed_batch.BatchAdapters`), by
wrapping the ``compute_batch(model, batch_data)`` method of each model runner the manager creates, which runs
right before every forward: it reads the requests of the step in packing order and their query lengths.

* **Which adapter a request uses** travels in its request id, ``"<uuid>@<adapter>"`` (`request_id`,
  `adapter_of`; the adapter's name in the model): no table to keep in sync with cancellations, and forked
  requests (``"<id>__child#i"``) inherit it.
* **Prefix caching is off** (``allow_block_sharing=False``): the engine keys cached blocks by token ids only,
  so two adapters would otherwise share KV blocks of the same prompt (`engine_config`).
* **Sizing is explicit** on the CPU (the engine's own sizing from system memory takes seconds and gigabytes);
  CUDA graphs and async batching are off until the index lives in a static device buffer.
* **A guard** (a forward pre-hook on the model) fails a continuous-batching forward that arrives without an
  index, so an engine change shows as failed requests, never as silently wrong adapters.
* **Greedy steps skip sampling.** The engine samples (so that each request may set its temperature); a step
  whose requests are all greedy (``top_k=1``, `request_sampling`) runs as an argmax step instead, without the
  sorting of the top-k and top-p processors: the same tokens, at the cost of ``generate``'s greedy search.

`engine_problems` lists what this module relies on that the installed Transformers lacks; the server falls back
to static batching when it is not empty. Tested with Transformers 5.25 (`TESTED_TRANSFORMERS`); the test
``tests/test_continuous.py`` checks these internals and compares every answer with ``generate``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lntune.mixed_batch import BASE_ADAPTER_NAME

#: The Transformers releases this module was written against and tested with.
TESTED_TRANSFORMERS = "5.25"

#: How the engine names the children of a forked request, and its warm-up requests.
CHILD_SEPARATOR = "__child#"
WARMUP_PREFIX = "__warmup_"


def engine_problems() -> list[str]:
    """What this module needs from Transformers' continuous batching and does not find (empty: all there).

    Example:
        >>> engine_problems()
        []
    """
    try:
        from transformers import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import continuous_api, input_outputs, model_runner, requests
    except ImportError as exc:
        return [f"transformers has no continuous batching ({exc})"]
    problems = []

    def need(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    manager = continuous_api.ContinuousBatchingManager
    need(
        callable(getattr(manager, "_create_batch_processor", None)), "ContinuousBatchingManager._create_batch_processor"
    )
    need(
        callable(getattr(manager, "register_result_handler", None)), "ContinuousBatchingManager.register_result_handler"
    )
    need(hasattr(continuous_api, "OutputRouter"), "OutputRouter (result handlers)")
    runner = getattr(model_runner, "ModelRunner", None)
    params = list(inspect.signature(runner.compute_batch).parameters) if runner else []
    need(
        params == ["self", "model", "batch_data"], f"ModelRunner.compute_batch(self, model, batch_data), found {params}"
    )
    need(
        {"state", "query_length"} <= set(getattr(requests.FutureRequestState, "__slots__", ())),
        "FutureRequestState.state and .query_length",
    )
    source = inspect.getsource(input_outputs.ContinuousBatchingIOs.prepare_batch_tensors)
    need(
        "self.requests_in_batch.append(future_state)" in source and "tokens_to_process" in source,
        "prepare_batch_tensors packs requests_in_batch in order, tokens_to_process of each",
    )
    add = inspect.signature(manager.add_request).parameters
    need({"request_id", "max_new_tokens", "streaming", "eos_token_id"} <= set(add), "add_request's parameters")
    need(hasattr(ContinuousBatchingConfig(), "allow_block_sharing"), "ContinuousBatchingConfig.allow_block_sharing")
    need(
        hasattr(ContinuousBatchingConfig(), "per_request_processors"), "ContinuousBatchingConfig.per_request_processors"
    )
    sample = inspect.getsource(model_runner.ModelRunner._sample) if runner else ""
    need("self.do_sample" in sample, "ModelRunner._sample reads self.do_sample")
    process = inspect.getsource(model_runner.ModelRunner._forward_process_and_sample) if runner else ""
    need("self.logit_processor.do_processing" in process, "ModelRunner reads logit_processor.do_processing")
    need("logit_processor_kwargs" in getattr(requests.RequestState, "__dataclass_fields__", {}), "RequestState kwargs")
    return problems


def engine_config(
    max_batch_tokens: int, max_requests: int, cache_tokens: int | None, page_size: int = 16, seed: int | None = None
):
    """The engine's `ContinuousBatchingConfig` for adapters: no prefix sharing, explicit sizing, per-request sampling.

    Args:
        max_batch_tokens: Most tokens packed into one forward (a longer prompt is prefilled over several steps).
        max_requests: Most requests in one step.
        cache_tokens: KV cache capacity in tokens (None: the engine sizes it from free memory, as on a GPU).
        page_size: Tokens per cache page.
        seed: The engine's sampling seed (one for the whole engine).

    Returns:
        A ``transformers.ContinuousBatchingConfig``.
    """
    from transformers import ContinuousBatchingConfig

    num_blocks = None if cache_tokens is None else max(4, -(-cache_tokens // page_size))
    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_requests,
        allow_block_sharing=False,  # cached blocks are keyed by token ids only: never share them across adapters
        use_cuda_graph=False,  # the per-token index is set per step from the host (no static buffer yet)
        use_async_batching=False,
        default_compile_level=0,
        max_blocks_per_request=0,
        per_request_processors=True,  # temperature, top_k and top_p per request
        seed=seed,
    )


def sampling_generation_config(eos_token_id: int | list[int] | None, pad_token_id: int | None):
    """The engine's `GenerationConfig`: sampling on, with temperature, top-k and top-p processors present (so that
    each request can set its own; a request with ``top_k=1`` is greedy).

    The defaults here are never used: every request passes all three (`request_sampling`).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.5,  # not 1: the processor exists only when the default is not a no-op
        top_k=2,  # not 0, likewise
        top_p=0.5,  # not 1, likewise
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def request_sampling(temperature: float, top_p: float, vocab_size: int) -> dict:
    """The per-request sampling arguments of ``add_request``: greedy at temperature 0 (``top_k=1``), else sampling
    over the whole vocabulary at ``temperature`` with nucleus ``top_p``."""
    if temperature == 0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"temperature": float(temperature), "top_k": int(vocab_size), "top_p": float(top_p)}


def request_id(unique: str, adapter: str) -> str:
    """The engine request id of a request running ``adapter`` (its name in the model; ``"__base__"``: none).

    ``unique`` must not contain ``"@"``; adapter names in the model contain neither ``"@"`` nor the engine's
    fork separator.
    """
    return f"{unique}@{adapter}"


def adapter_of(engine_request_id: str) -> str:
    """The adapter of a request, fork or warm-up request (warm-up: the base model)."""
    if engine_request_id.startswith(WARMUP_PREFIX):
        return BASE_ADAPTER_NAME
    _, separator, adapter = engine_request_id.partition("@")
    adapter = adapter.split(CHILD_SEPARATOR, 1)[0]
    if not separator or not adapter:
        raise KeyError(f"continuous-batching request {engine_request_id!r} names no adapter")
    return adapter


@dataclass
class Step:
    """The requests of one engine step, in packing order, and their token counts."""

    request_ids: list[str]
    query_lengths: list[int]
    num_tokens: int
    greedy: bool = False  # every request of the step is greedy


@dataclass
class StepStats:
    """What the router saw (for tests and metrics)."""

    steps: int = 0
    max_adapters_in_step: int = 0
    mixed_prefill_decode_steps: int = 0
    threads: set = field(default_factory=set)


class TokenRouter:
    """Routes every packed token of every engine forward to its request's adapter.

    Args:
        on_step: Called before each forward with the `Step` (its request ids, query lengths, packed length);
            it sets the per-token adapter index (the `GenerationEngine` updates its `BatchAdapters`).

    Example:
        >>> router = TokenRouter(engine.set_step)
        >>> router.install(manager)
    """

    def __init__(self, on_step: Callable[[Step], None]) -> None:
        self.on_step = on_step
        self.stats = StepStats()
        self.current: Step | None = None
        self.failed_step: Step | None = None  # the step whose forward raised (its requests failed with it)
        self._local = threading.local()

    def install(self, manager) -> None:
        """Wrap ``manager``'s batch-processor factory (every model runner it makes is routed); guard its model."""
        factory = manager._create_batch_processor
        router = self

        def create_batch_processor():
            processor = factory()
            router._wrap(processor.model_runner)
            return processor

        manager._create_batch_processor = create_batch_processor
        if getattr(manager, "batch_processor", None) is not None:
            self._wrap(manager.batch_processor.model_runner)
        model = manager.model
        if not getattr(model, "_lntune_routed_by", None):
            model.register_forward_pre_hook(_guard, with_kwargs=True)
        model._lntune_routed_by = self

    def _wrap(self, runner) -> None:
        if getattr(runner, "_lntune_router", None) is self:
            return
        compute_batch = getattr(runner, "_lntune_compute_batch", runner.compute_batch)
        router = self

        def routed(model, batch_data):
            step = router._step(runner.inputs_and_outputs, batch_data)
            router.on_step(step)
            router.current = step
            model._lntune_index_set = True
            sampling = runner.do_sample, runner.logit_processor.do_processing
            if step.greedy:  # argmax: the tokens top_k=1 sampling would draw, without sorting the vocabulary
                runner.do_sample = runner.logit_processor.do_processing = False
            try:
                return compute_batch(model, batch_data)
            except BaseException:
                router.failed_step = step
                raise
            finally:
                runner.do_sample, runner.logit_processor.do_processing = sampling
                model._lntune_index_set = False
                router.current = None

        runner._lntune_compute_batch = compute_batch
        runner.compute_batch = routed
        runner._lntune_router = self

    def _step(self, io, batch_data: dict) -> Step:
        requests = io.requests_in_batch
        lengths = [future.query_length for future in requests]
        ids = [future.state.request_id for future in requests]
        num_tokens = batch_data["input_ids"].shape[1]
        cumulative = batch_data["cu_seq_lens_q"].tolist()
        expected = [0]
        for length in lengths:
            expected.append(expected[-1] + length)
        if cumulative[: len(expected)] != expected or expected[-1] > num_tokens:
            raise RuntimeError(
                f"lntune: continuous batching packed this step differently than expected (cu_seq_lens_q {cumulative}, "
                f"query lengths {lengths}, {num_tokens} tokens): this Transformers release is not supported."
            )
        stats = self.stats
        stats.steps += 1
        stats.max_adapters_in_step = max(stats.max_adapters_in_step, len({adapter_of(i) for i in ids}))
        if any(n > 1 for n in lengths) and any(n == 1 for n in lengths):
            stats.mixed_prefill_decode_steps += 1
        stats.threads.add(threading.current_thread().name)
        greedy = all(future.state.logit_processor_kwargs.get("top_k") == 1 for future in requests)
        return Step(ids, lengths, num_tokens, greedy)


def token_index(step: Step, positions: dict[str, int], device: torch.device) -> torch.Tensor:
    """Each packed token's position in the step's adapter list: ``positions[adapter of its request]``; padding
    tokens (after the last request) take the first adapter's."""
    rows = [positions[adapter_of(i)] for i in step.request_ids]
    index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), torch.tensor(step.query_lengths))
    if step.num_tokens > index.numel():
        index = torch.cat([index, index.new_zeros(step.num_tokens - index.numel())])
    return index.to(device)


def step_adapters(step: Step) -> list[str]:
    """The distinct adapters of a step, in first-seen order."""
    return list(dict.fromkeys(adapter_of(i) for i in step.request_ids))


def _guard(model: nn.Module, args: tuple, kwargs: dict):
    """A continuous-batching forward (it carries ``logits_indices`` or a paged cache) without an adapter index means
    the engine stopped calling the routed ``compute_batch``: fail it rather than run the wrong adapters."""
    paged = "logits_indices" in kwargs or type(kwargs.get("cache")).__name__ == "PagedAttentionCache"
    if paged and not getattr(model, "_lntune_index_set", False):
        raise RuntimeError(
            "lntune: a continuous-batching forward arrived without a per-token adapter index; this Transformers "
            f"release calls the model in a way lntune does not know (tested: {TESTED_TRANSFORMERS})."
        )


def cancel(manager, engine_request_id: str) -> None:
    """Cancel a request and drop its result handler (the engine delivers no final output for a cancelled request,
    so its handler would otherwise stay registered)."""
    manager.cancel_request(engine_request_id)
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(engine_request_id, None)


def pending_requests(manager) -> Sequence[str]:
    """Ids of requests that still have a result handler (submitted, not finished)."""
    router = manager.output_router
    with router._lock:
        return list(router.result_handlers)
