"""`GenerationEngine`: continuous batching with one adapter per request, on Transformers' engine.

Requests are added to Transformers' `ContinuousBatchingManager` as they arrive and leave it as soon as they
end, so a short answer never waits for a long one and a new request joins the next step. Each request runs
its own adapter: lntune's norm layers read a per-token adapter index that `lntune.serve.continuous` sets
before every step. Results stream back to the event loop through the manager's result handlers.

Faults: a forward that raises kills the manager, which fails every request. The engine then starts a new
manager, fails the requests of the step that raised (the ones it concerns), and re-submits the others with
what they had generated so far as part of their prompt: they continue as if nothing happened (greedy
answers are the same), and the restart is counted in the metrics.

Adapters are loaded and unloaded only while the manager is paused (`paused`), between two steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lntune.mixed_batch import BASE_ADAPTER_NAME, BatchAdapters
from lntune.serve import continuous
from lntune.serve.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """The engine's limits: tokens per forward, requests per step, KV cache capacity (None: sized by the engine)."""

    max_batch_tokens: int
    max_requests: int
    cache_tokens: int | None


@dataclass
class Completion:
    """What a request has produced so far: its new tokens, and how it ended (None while it runs)."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (end-of-sequence token) or "length" (max tokens)


@dataclass(eq=False)
class _Live:
    """One request in the engine: its adapter, prompt, budget, sampling, and where its outputs go."""

    adapter: str
    prompt: list[int]
    max_new_tokens: int
    sampling: dict
    queue: asyncio.Queue
    engine_id: str = ""
    manager: object = None  # the manager it was submitted to, with its router
    router: continuous.TokenRouter | None = None
    done: list[int] = field(default_factory=list)  # tokens generated before a re-submission


class GenerationEngine:
    """Continuous batching of one model, one adapter per request.

    Args:
        model: The Transformers causal LM (wrapped in place by lntune when adapters load).
        tuner: Returns the model's `LNTuningModel`, or None while no adapter was ever loaded.
        settings: The engine's limits.
        eos_token_ids: Tokens that end an answer.
        pad_token_id: The tokenizer's pad token.
        on_restart: Called after the engine restarted following a fault (metrics).
        on_failure: Called for each request a failed step failed (metrics).

    Example:
        >>> engine = GenerationEngine(model, lambda: slot.peft and slot.peft.base_model, settings, [2], 0)
        >>> engine.start()
        >>> async for completion in engine.generate([1, 5, 9], "a3", 16, temperature=0, top_p=1):
        ...     print(completion.tokens)
    """

    def __init__(
        self,
        model: nn.Module,
        tuner: Callable[[], nn.Module | None],
        settings: GenerationSettings,
        eos_token_ids: list[int],
        pad_token_id: int,
        on_restart: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.tuner = tuner
        self.settings = settings
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.on_restart = on_restart or (lambda: None)
        self.on_failure = on_failure or (lambda: None)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.batch = BatchAdapters.from_token_index([BASE_ADAPTER_NAME], torch.zeros(1, dtype=torch.long))
        self.router: continuous.TokenRouter | None = None
        self.manager = None
        self._live: dict[str, _Live] = {}
        self._restarting: asyncio.Future | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Create and start a manager (in inference mode: the engine's thread inherits it)."""
        config = continuous.engine_config(
            self.settings.max_batch_tokens, self.settings.max_requests, self.settings.cache_tokens
        )
        generation = continuous.sampling_generation_config(self.eos_token_ids or None, self.pad_token_id)
        manager = self.model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        router = continuous.TokenRouter(self._set_step)  # one per manager: it remembers that manager's failed step
        router.install(manager)
        self._attach()
        with torch.inference_mode():
            manager.start()
        deadline = time.monotonic() + 60
        while manager.batch_processor is None and manager.is_running() and time.monotonic() < deadline:
            time.sleep(0.002)  # the engine makes its cache in its own thread: ready once it exists
        self.manager, self.router = manager, router

    def stop(self) -> None:
        """Stop the manager after the requests in flight finish."""
        if self.manager is not None and self.manager.is_running():
            self.manager.stop(block=True, timeout=60)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Pause the engine between two steps (to load or unload adapters); new adapter layers join the routing."""
        running = self.manager is not None and self.manager.is_running()
        with self.manager.pause() if running else contextlib.nullcontext():
            try:
                yield
            finally:
                self.batch.forget()  # what was kept of the adapters may have changed
                self._attach()

    def _attach(self) -> None:
        """Put the per-token `BatchAdapters` on every adapter wrapper that lacks it (new ones, after a load)."""
        tuner = self.tuner()
        if tuner is None:
            return
        for _, wrapper in tuner.tuner_modules():
            if wrapper._batch_adapters is not self.batch:
                wrapper.set_batch_adapters(self.batch)

    # ------------------------------------------------------------------------------ adapters
    def _set_step(self, step: continuous.Step) -> None:
        """Before each forward (engine thread): point each token at its request's adapter."""
        names = continuous.step_adapters(step)
        positions = {name: i for i, name in enumerate(names)}
        device = next(self.model.parameters()).device
        self.batch.update(names, continuous.token_index(step, positions, device))

    # ------------------------------------------------------------------------------- requests
    async def generate(
        self, prompt: list[int], adapter: str, max_new_tokens: int, temperature: float, top_p: float
    ) -> AsyncIterator[Completion]:
        """Generate an answer with ``adapter`` (an internal name, resident; ``"__base__"``: none).

        Yields the `Completion` so far after each new token; the last one has ``finish`` set. Leaving the
        iteration early (a client that went away) cancels the request in the engine.

        Raises:
            APIError: 500 if the request failed in a step that raised (the engine restarts; others go on).
        """
        live = _Live(
            adapter=adapter,
            prompt=list(prompt),
            max_new_tokens=max_new_tokens,
            sampling=continuous.request_sampling(temperature, top_p, self.vocab_size),
            queue=asyncio.Queue(),
        )
        await self._submit(live)
        finished = False
        try:
            while True:
                output = await live.queue.get()
                if isinstance(output, BaseException):
                    raise output
                tokens = live.done + list(output.generated_tokens)
                finish = None
                if output.is_finished():
                    finished = True
                    ended = bool(tokens) and tokens[-1] in self.eos_token_ids
                    if ended:
                        tokens = tokens[:-1]
                    finish = "stop" if ended else "length"
                yield Completion(tokens, finish)
                if finished:
                    return
        finally:
            self._live.pop(live.engine_id, None)
            if not finished and live.manager is not None:
                continuous.cancel(live.manager, live.engine_id)

    async def _submit(self, live: _Live) -> None:
        """Add ``live`` to the engine (again, after a restart), restarting a dead engine first."""
        for _ in range(2):
            if self._restarting is not None:
                await self._restarting
            manager = self.manager
            live.engine_id = continuous.request_id(uuid.uuid4().hex, live.adapter)
            live.manager, live.router = manager, self.router
            self._live[live.engine_id] = live
            manager.register_result_handler(live.engine_id, lambda out, live=live: self._deliver(live, out))
            accepted = manager.add_request(
                live.prompt + live.done,
                request_id=live.engine_id,
                max_new_tokens=live.max_new_tokens - len(live.done),
                streaming=True,
                eos_token_id=self.eos_token_ids or -1,
                **live.sampling,
            )
            if accepted is not None:
                return
            self._live.pop(live.engine_id, None)
            continuous.cancel(manager, live.engine_id)
            await self._restart(manager)
        raise APIError(503, "The generation engine is not accepting requests; retry.", type="server_error")

    def _deliver(self, live: _Live, output) -> None:
        """A result for ``live`` (on the event loop)."""
        if self._live.get(output.request_id) is not live:
            return  # an output of a request id that was re-submitted or cancelled meanwhile
        if output.error is None:
            live.queue.put_nowait(output)
            return
        failed = live.router.failed_step  # set in the engine thread before the failed outputs are delivered
        if failed is None:  # this request alone failed (the engine runs on)
            live.queue.put_nowait(_failed(output.error))
            return
        # A step raised and the engine died: the request fails if it was in that step, else it goes on after a restart.
        self._live.pop(output.request_id, None)
        if output.request_id in failed.request_ids:
            self.on_failure()
            live.queue.put_nowait(_failed(output.error))
            return
        live.done = live.done + list(output.generated_tokens)
        asyncio.get_running_loop().create_task(self._resume(live))

    async def _resume(self, live: _Live) -> None:
        try:
            await self._restart(live.manager)
            await self._submit(live)
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
            live.queue.put_nowait(exc)

    async def _restart(self, crashed) -> None:
        """Replace the dead manager ``crashed`` by a new one (once, however many requests notice it)."""
        if self._restarting is not None:
            await self._restarting
        if self.manager is not crashed:  # replaced already
            return
        self._restarting = asyncio.get_running_loop().create_future()
        try:
            logger.warning("lntune serve: a generation step failed; restarting the engine (other requests continue)")
            await asyncio.to_thread(lambda: crashed.stop(block=True, timeout=30))
            await asyncio.to_thread(self.start)
            self.on_restart()
        finally:
            self._restarting.set_result(None)
            self._restarting = None


def _failed(error: str) -> APIError:
    return APIError(500, f"Generation failed in the engine step that ran this request: {error}", type="server_error")
