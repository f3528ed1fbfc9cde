"""`ServingService`: the state of one server, shared by its endpoints, and the shared request steps.

It holds the catalog, the resident adapters, the worker and the metrics, and answers the endpoints
every task has (``/v1/models``, ``/v1/adapters``, ``/info``). The task endpoints live in
`lntune.serve.encoders` (embeddings, classification, rerank, score) and `lntune.serve.completions`: a
request is checked (task, options, input sizes), its adapter found in the catalog (404/400 before anything
is queued), its texts tokenized (on the event loop: the worker only pads), then queued as one work item
per text.

A service made with `ServingService.deferred` loads its model in a background thread when started, so that
the server listens (``/health``, ``/ready``: 503) while the model loads; requests get 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from lntune.loading import load_tokenizer
from lntune.mixed_batch import BASE_ADAPTER_NAME
from lntune.serve import continuous
from lntune.serve.batcher import Batcher, WorkItem
from lntune.serve.catalog import AdapterCatalog, AdapterSource
from lntune.serve.config import MAX_BATCH_TOKENS, ServeConfig
from lntune.serve.engine import Engine, Sampling
from lntune.serve.errors import APIError, bad_request, not_ready
from lntune.serve.generation import GenerationEngine, GenerationSettings
from lntune.serve.metrics import GenerationMetrics, ServerMetrics
from lntune.serve.pooling import read_pooling
from lntune.serve.registry import AdapterRegistry, Resident
from lntune.serve.schemas import (
    AdapterLoadRequest,
    AdapterStatus,
    LoRALoadRequest,
    LoRAUnloadRequest,
    ModelCard,
    ModelList,
)
from lntune.tasks import TASKS, task_named

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: its token ids and, for a text pair, its segment ids."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos]


class ServingService:
    """The server's state (catalog, resident adapters, worker, metrics) and the steps its endpoints share.

    Args:
        config: The server's settings.
        tokenizer: The base model's tokenizer (with a pad token); None with ``engine`` None (see `deferred`).
        engine: The models; None: loaded by `start`, in the background.
        metrics: Where metrics go (a new registry by default).

    Example:
        >>> service = ServingService.from_config(config, tokenizer)
        >>> service.start()
        >>> [card.id for card in service.models().data]
        ['all-MiniLM-L6-v2', 'lntune-output']
    """

    def __init__(
        self, config: ServeConfig, tokenizer=None, engine: Engine | None = None, metrics: ServerMetrics | None = None
    ) -> None:
        self.config = config
        self.task = task_named(config.task)
        self.metrics = metrics or ServerMetrics()
        self.catalog = AdapterCatalog(
            config.adapters_dir,
            config.model_id,
            config.task,
            base_model_path=config.model_path,
            allow_any_path=config.allow_any_adapter_path,
        )
        self.generation_metrics = GenerationMetrics(self.metrics.registry)
        #: Continuous batching for generation (None: static batches, or a task that does not generate).
        self.generation: GenerationEngine | None = None
        self.created = int(time.time())
        self.tokenizer = None
        self.engine: Engine | None = None
        self.registry: AdapterRegistry | None = None
        self.batcher: Batcher | None = None
        #: ``loading`` (model or ``--preload`` in progress), ``ready``, ``failed`` or ``stopping``.
        self.state = "loading"
        self.load_error: BaseException | None = None
        #: Called (from the loading thread) with the error if the background load fails.
        self.on_failure: Callable[[BaseException], None] | None = None
        self._loader: threading.Thread | None = None
        self._left_tokenizer = None
        if engine is not None:
            self._attach(tokenizer, engine)

    @classmethod
    def from_config(cls, config: ServeConfig, tokenizer=None) -> ServingService:
        """Load the base model (and, unless given, the tokenizer) for ``config`` now; adapters load on first use."""
        tokenizer = tokenizer or load_tokenizer(config.model_path)
        return cls(config, tokenizer, _engine(config, tokenizer))

    @classmethod
    def deferred(cls, config: ServeConfig) -> ServingService:
        """A service whose model loads in the background when `start` is called (the server listens meanwhile)."""
        return cls(config)

    def _attach(self, tokenizer, engine: Engine) -> None:
        config = self.config
        self.tokenizer, self.engine = tokenizer, engine
        self.catalog.base_labels = dict(engine.base_labels)
        self.registry = AdapterRegistry(engine, config.max_resident, self.metrics)
        self.batcher = Batcher(
            engine,
            self.registry,
            self.metrics,
            config.max_batch_size,
            config.max_wait_ms,
            max_batch_tokens=config.max_batch_tokens or MAX_BATCH_TOKENS,
            max_queue=config.max_queue,
        )
        if self.task.generates:
            self.generation = self._generation_engine()

    @property
    def ready(self) -> bool:
        """Whether requests are served (the model is loaded and ``--preload`` done, and not stopping)."""
        return self.state == "ready"

    def _generation_engine(self) -> GenerationEngine | None:
        """Continuous batching for generation, unless switched off or Transformers lacks what it needs (then
        generation runs in static batches, and one log line says why)."""
        problems = continuous.engine_problems() if self.config.continuous_batching else ["--no-continuous-batching"]
        if problems:
            logger.warning("lntune serve: generation runs in static batches (no continuous batching: %s)", problems[0])
            return None
        slot = self.engine.slot
        cpu = self.engine.device.type == "cpu"
        settings = GenerationSettings(
            max_batch_tokens=self.config.max_batch_tokens or (256 if cpu else 4096),
            max_requests=self.config.max_batch_size,
            cache_tokens=self.config.kv_cache_tokens or (16384 if cpu else None),
        )
        generation = GenerationEngine(
            slot.model,
            lambda: None if slot.peft is None else slot.peft.base_model,
            settings,
            sorted(self.engine.eos_token_ids),
            self.engine.pad_token_id,
            on_restart=self.generation_metrics.restarts.inc,
            on_failure=self.generation_metrics.failed.inc,
        )
        self.engine.exclusive = generation.paused  # adapters load and unload between two engine steps
        return generation

    def start(self) -> None:
        """Start serving: load the model first if not loaded, then ``--preload``, in a background thread when
        there is loading to do (``state`` is ``loading`` meanwhile, then ``ready``)."""
        if self.engine is not None and not self.config.preload:
            self._start_workers()
            self.state = "ready"
            return
        self._loader = threading.Thread(target=self._load, name="lntune-serve-loader", daemon=True)
        self._loader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the background load; returns whether the service is ready."""
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _load(self) -> None:
        try:
            if self.engine is None:
                started = time.perf_counter()
                tokenizer = load_tokenizer(self.config.model_path)
                self._attach(tokenizer, _engine(self.config, tokenizer))
                logger.info("lntune serve: %s loaded in %.1f s", self.config.model_id, time.perf_counter() - started)
            if self.state == "stopping":
                return
            self._start_workers()
            if self.config.preload:
                self.preload()
        except BaseException as exc:  # reported by on_failure (the command line exits with one line)
            self.load_error = exc
            self.state = "failed"
            if self.on_failure is not None:
                self.on_failure(exc)
            else:
                logger.error("lntune serve: the model failed to load: %s", exc)
            return
        if self.state == "loading":
            self.state = "ready"
            logger.info("lntune serve: ready")

    def preload(self) -> dict[str, APIError]:
        """Load every adapter of the folder now (the first ``--max-resident``), logging progress; returns the
        failures by adapter name (their requests will fail as on first use)."""
        sources, failures = [], {}
        for name in self.catalog.names():
            try:
                source = self.catalog.resolve(name)
            except APIError as exc:
                failures[name] = exc
                continue
            if source is not None:
                sources.append(source)
        if len(sources) > self.config.max_resident:
            logger.warning(
                "lntune serve: --preload: %d adapters, --max-resident %d; the first %d are loaded",
                len(sources),
                self.config.max_resident,
                self.config.max_resident,
            )

        def progress(done: int, total: int, seconds: float) -> None:
            logger.info("lntune serve: preloading adapters: %d/%d (%.1f s)", done, total, seconds)

        done = threading.Event()
        result: dict = {}
        started = time.perf_counter()

        def load() -> None:
            try:
                result.update(self.registry.load_many(sources, progress))
            finally:
                done.set()

        self.batcher.post(load)  # on the worker thread, which owns the model
        done.wait()
        seconds = time.perf_counter() - started
        loaded = min(len(sources), self.config.max_resident) - len(result)
        failures.update(result)
        for error in failures.values():
            logger.warning("lntune serve: --preload: %s", error.message)
        rate = f"{loaded / seconds:.0f}/s" if seconds > 0 else "-"
        failed = f"; {len(failures)} failed (above)" if failures else ""
        logger.info("lntune serve: preloaded %d adapters in %.1f s (%s)%s", loaded, seconds, rate, failed)
        return failures

    def _start_workers(self) -> None:
        """Start the worker thread, then the generation engine (which runs its own thread)."""
        self.batcher.start()
        if self.generation is not None:
            self.generation.start()

    def stop(self) -> None:
        """Finish what is running and queued, then stop the generation engine and the worker thread."""
        self.state = "stopping"
        if self._loader is not None and self._loader.is_alive():
            self._loader.join(60)
        if self.generation is not None:
            self.generation.stop()
        if self.batcher is not None:
            self.batcher.stop()

    def require_ready(self) -> None:
        """Refuse (503, ``Retry-After``) while the model loads or the server stops."""
        if self.state == "ready":
            return
        if self.state == "stopping":
            raise not_ready("The server is shutting down.")
        if self.state == "failed":
            raise not_ready(f"The model failed to load: {self.load_error}")
        raise not_ready(f"The model {self.config.model_id} is loading; retry in a few seconds (GET /ready says when).")

    @contextlib.asynccontextmanager
    async def adapter_in_use(self, source: AdapterSource | None) -> AsyncIterator[str]:
        """The adapter of ``source`` made resident and pinned (kept loaded) for the body; yields its name in the
        model (``"__base__"`` for the base model).

        Raises:
            APIError: the adapter cannot be loaded (500 naming the file).
        """
        if source is None:
            yield BASE_ADAPTER_NAME
            return

        def prepare_and_pin() -> Resident:
            failures = self.registry.prepare([source])
            if failures:
                raise failures[source.name]
            return self.registry.pin(source.name)

        resident = await self.batcher.call(prepare_and_pin)
        try:
            yield resident.internal_name
        finally:
            self.batcher.post(lambda: self.registry.unpin(resident))

    @contextlib.contextmanager
    def metrics_running(self) -> Iterator[None]:
        """Count a generation request as running for the body."""
        self.generation_metrics.running.inc()
        try:
            yield
        finally:
            self.generation_metrics.running.dec()

    # --------------------------------------------------------------------------- endpoints
    def models(self) -> ModelList:
        """``GET /v1/models``: the base model, then every adapter that can be served."""
        base = self.config.model_id
        cards = [ModelCard(id=base, created=self.created, root=base)]
        cards += [ModelCard(id=n, created=self.created, root=base, parent=base) for n in self.catalog.names()]
        return ModelList(data=cards)

    def info(self) -> dict:
        """``GET /info``: the model, the task, its endpoints, the limits and lntune's version."""
        from lntune import __version__

        config = self.config
        return {
            "model_id": config.model_id,
            "task": config.task,
            "endpoints": list(self.task.endpoints),
            "version": __version__,
            "ready": self.ready,
            "state": self.state,
            "max_length": config.max_length,
            "max_inputs": config.max_inputs,
            "max_batch_size": config.max_batch_size,
            "max_batch_tokens": config.max_batch_tokens,
            "max_wait_ms": config.max_wait_ms,
            "max_queue": config.max_queue,
            "max_resident": config.max_resident,
            "request_timeout": config.request_timeout,
            "embedding_size": self.engine.embedding_size if self.engine is not None and self.task.embeds else None,
        }

    async def load_adapter(self, request: AdapterLoadRequest) -> AdapterStatus:
        """``POST /v1/adapters``: load (or replace) an adapter now; on failure the previous state stays."""
        before = self.catalog.snapshot(request.name)
        source = self.catalog.register(request.name, request.path)
        try:
            await self.batcher.call(lambda: self.registry.load(source))
        except APIError:
            self.catalog.restore(request.name, before)
            raise
        return AdapterStatus(id=request.name, path=request.path, resident=True)

    async def unload_adapter(self, name: str) -> AdapterStatus:
        """``DELETE /v1/adapters/{name}``: unload it; it is not served until registered again (requests running
        it finish on it first)."""
        self.catalog.forget(name)
        await self.batcher.call(lambda: self.registry.remove(name))
        return AdapterStatus(id=name, resident=False)

    async def load_lora_adapter(self, request: LoRALoadRequest) -> str:
        """vLLM's ``POST /v1/load_lora_adapter``: `load_adapter` under vLLM's names; an adapter of that name is
        refused unless ``load_inplace`` (which replaces it), as vLLM does. Returns vLLM's success message."""
        if not request.load_inplace and self.catalog.exists(request.lora_name):
            raise bad_request(
                f"The adapter '{request.lora_name}' is already served; pass \"load_inplace\": true to replace it.",
                param="lora_name",
                code="adapter_exists",
            )
        await self.load_adapter(AdapterLoadRequest(name=request.lora_name, path=request.lora_path))
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: LoRAUnloadRequest) -> str:
        """vLLM's ``POST /v1/unload_lora_adapter``: `unload_adapter`; returns vLLM's success message."""
        await self.unload_adapter(request.lora_name)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    # ----------------------------------------------------------------------------- helpers
    def require_endpoint(self, endpoint: str) -> None:
        """Refuse (400, ``wrong_endpoint``) an endpoint this server's task does not serve, naming the task that does."""
        if endpoint not in self.task.endpoints:
            serving = next(name for name, task in TASKS.items() if endpoint in task.endpoints)
            raise bad_request(
                f"This server serves {self.task.name} ({', '.join(self.task.endpoints)}); start lntune "
                f"serve --task {serving} for {endpoint}.",
                code="wrong_endpoint",
            )

    def texts(self, value: str | list[str], param: str) -> list[str]:
        """The request's texts (``input`` or ``prompt``) as a list, checked: not empty, not too many."""
        texts = [value] if isinstance(value, str) else list(value)
        if not texts:
            raise bad_request(f"{param} must not be empty.", param=param)
        if len(texts) > self.config.max_inputs:
            raise bad_request(
                f"{param} has {len(texts)} items; at most {self.config.max_inputs} per request.", param=param
            )
        for i, text in enumerate(texts):
            if not text:
                raise bad_request(f"{param}[{i}] is an empty string.", param=param)
        return texts

    def tokenize(self, texts: list[str], param: str) -> list[list[int]]:
        """Token ids of each text; a text longer than ``--max-length`` tokens is refused with 400 (completions)."""
        started = time.perf_counter()
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        self.metrics.tokenization_time.observe(time.perf_counter() - started)
        for i, tokens in enumerate(ids):
            if len(tokens) > self.config.max_length:
                raise bad_request(
                    f"{param}[{i}] has {len(tokens)} tokens, more than --max-length {self.config.max_length}; "
                    "shorten it (inputs are refused, not truncated).",
                    param=param,
                    code="input_too_long",
                )
        return ids

    def token_limit(self, source: AdapterSource | None) -> tuple[int, str]:
        """The most tokens per input for ``source``, and where the limit comes from (for messages): the
        adapter's recorded ``max_length``, capped by ``--max-length``."""
        limit = self.config.max_length
        if source is not None and source.max_length is not None and source.max_length < limit:
            return source.max_length, f"adapter '{source.name}' was trained with max_length {source.max_length}"
        return limit, f"--max-length {limit}"

    def encode(
        self,
        source: AdapterSource | None,
        texts: list[str],
        param: str,
        truncate: bool = True,
        direction: str = "right",
        pairs: list[str] | None = None,
    ) -> list[Encoded]:
        """Tokenize ``texts`` (with ``pairs``: the text pairs ``(texts[i], pairs[i])``) as ``source`` was trained.

        Inputs are truncated at `token_limit` on the ``direction`` side by the tokenizer's own truncation, as
        ``lntune train`` and ``lntune eval`` do, so that a served adapter answers as it was evaluated. With
        ``truncate`` False an input over the limit is refused with 400 (``input_too_long``).
        """
        limit, why = self.token_limit(source)
        tokenizer = self.tokenizer
        if direction == "left":
            if self._left_tokenizer is None:
                self._left_tokenizer = copy.deepcopy(self.tokenizer)
                self._left_tokenizer.truncation_side = "left"
            tokenizer = self._left_tokenizer
        options = {"truncation": True, "max_length": limit} if truncate else {}
        started = time.perf_counter()
        encoded = (
            tokenizer(texts, pairs, add_special_tokens=True, **options)
            if pairs
            else tokenizer(texts, add_special_tokens=True, **options)
        )
        self.metrics.tokenization_time.observe(time.perf_counter() - started)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") if pairs else None
        for i, tokens in enumerate(ids):
            if len(tokens) > limit:
                raise bad_request(
                    f"{param}[{i}] has {len(tokens)} tokens, more than {limit} ({why}); send it with "
                    '"truncate": true (the default) to cut it as training did, or shorten it.',
                    param=param,
                    code="input_too_long",
                )
        return [Encoded(x, types[i] if types is not None else None) for i, x in enumerate(ids)]

    async def run(
        self, source: AdapterSource | None, ids: list[list[int]], sampling: Sampling | None = None, budget: int = 0
    ) -> list:
        """Queue one work item per token list (with ``sampling``: generation) and wait for all results."""
        loop = asyncio.get_running_loop()
        items = [WorkItem(source, x, loop.create_future(), sampling, budget) for x in ids]
        return await self.batcher.submit(items, timeout=self.config.request_timeout)

    async def run_encoded(self, items: list[tuple[AdapterSource | None, Encoded]]) -> list:
        """Queue one work item per (adapter, input) of one request, and wait for all results (encoders)."""
        loop = asyncio.get_running_loop()
        work = [
            WorkItem(source, e.input_ids, loop.create_future(), token_type_ids=e.token_type_ids) for source, e in items
        ]
        return await self.batcher.submit(work, timeout=self.config.request_timeout)


def _engine(config: ServeConfig, tokenizer) -> Engine:
    pooling = read_pooling(config.model_path) if task_named(config.task).embeds else None
    return Engine(config.model_path, config.task, tokenizer.pad_token_id, _eos_ids(tokenizer), pooling)
