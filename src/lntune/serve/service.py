"""`ServingService`: the state of one server, shared by its endpoints, and the shared request steps.

It holds the catalog, the resident adapters, the worker and the metrics, and answers the endpoints
every task has (``/v1/models``, ``/v1/adapters``). The task endpoints live in `lntune.serve.encoders`
(embeddings, classification) and `lntune.serve.completions`: a request is checked (task, options,
input sizes), its adapter found in the catalog (404/400 before anything is queued), its texts
tokenized (on the event loop: the worker only pads), then queued as one work item per text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

from lntune.loading import load_tokenizer
from lntune.mixed_batch import BASE_ADAPTER_NAME
from lntune.serve import continuous
from lntune.serve.batcher import Batcher, WorkItem
from lntune.serve.catalog import AdapterCatalog, AdapterSource
from lntune.serve.config import ServeConfig
from lntune.serve.engine import Engine, Sampling
from lntune.serve.errors import APIError, bad_request
from lntune.serve.generation import GenerationEngine, GenerationSettings
from lntune.serve.metrics import GenerationMetrics, ServerMetrics
from lntune.serve.pooling import read_pooling
from lntune.serve.registry import AdapterRegistry, Resident
from lntune.serve.schemas import (
    AdapterLoadRequest,
    AdapterStatus,
    ModelCard,
    ModelList,
)
from lntune.tasks import TASKS, task_named

_MAX_STOP = 4

logger = logging.getLogger(__name__)


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos]


class ServingService:
    """The server's state (catalog, resident adapters, worker, metrics) and the steps its endpoints share.

    Args:
        config: The server's settings.
        tokenizer: The base model's tokenizer (with a pad token).
        engine: The models.
        metrics: Where metrics go (a new registry by default).

    Example:
        >>> service = ServingService.from_config(config, tokenizer)
        >>> service.start()
        >>> [card.id for card in service.models().data]
        ['all-MiniLM-L6-v2', 'lntune-output']
    """

    def __init__(self, config: ServeConfig, tokenizer, engine: Engine, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.task = task_named(config.task)
        self.tokenizer = tokenizer
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.catalog = AdapterCatalog(config.adapters_dir, config.model_id, config.task, engine.base_labels)
        self.registry = AdapterRegistry(engine, config.max_resident, self.metrics)
        self.batcher = Batcher(engine, self.registry, self.metrics, config.max_batch_size, config.max_wait_ms)
        self.generation_metrics = GenerationMetrics(self.metrics.registry)
        self.generation = self._generation_engine() if self.task.generates else None
        self.created = int(time.time())

    @classmethod
    def from_config(cls, config: ServeConfig, tokenizer=None) -> ServingService:
        """Load the base model (and, unless given, the tokenizer) for ``config``; adapters load on first use."""
        tokenizer = tokenizer or load_tokenizer(config.model_path)
        pooling = read_pooling(config.model_path) if task_named(config.task).embeds else None
        engine = Engine(config.model_path, config.task, tokenizer.pad_token_id, _eos_ids(tokenizer), pooling)
        return cls(config, tokenizer, engine)

    def _generation_engine(self) -> GenerationEngine | None:
        """Continuous batching for generation, unless switched off or Transformers lacks what it needs (then
        generation runs in static batches, and one log line says why)."""
        problems = continuous.engine_problems() if self.config.continuous_batching else ["--no-continuous-batching"]
        if problems:
            logger.warning("lntune serve: generation runs in static batches (no continuous batching: %s)", problems[0])
            return None
        slot = self.engine.slots[self.engine.primary_key]
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
        """Start the worker thread (and the generation engine)."""
        self.batcher.start()
        if self.generation is not None:
            self.generation.start()

    def stop(self) -> None:
        """Finish what is running and queued, then stop the generation engine and the worker thread."""
        if self.generation is not None:
            self.generation.stop()
        self.batcher.stop()

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
        """``DELETE /v1/adapters/{name}``: unload it; it is not served until registered again."""
        self.catalog.forget(name)
        await self.batcher.call(lambda: self.registry.remove(name))
        return AdapterStatus(id=name, resident=False)

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
        """Token ids of each text; a text longer than ``--max-length`` tokens is refused with 400."""
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, tokens in enumerate(ids):
            if len(tokens) > self.config.max_length:
                raise bad_request(
                    f"{param}[{i}] has {len(tokens)} tokens, more than --max-length {self.config.max_length}; "
                    "shorten it (inputs are refused, not truncated).",
                    param=param,
                    code="input_too_long",
                )
        return ids

    async def run(
        self, source: AdapterSource | None, ids: list[list[int]], sampling: Sampling | None = None, budget: int = 0
    ) -> list:
        """Queue one work item per token list (with ``sampling``: generation) and wait for all results."""
        loop = asyncio.get_running_loop()
        return await self.batcher.submit([WorkItem(source, x, loop.create_future(), sampling, budget) for x in ids])
