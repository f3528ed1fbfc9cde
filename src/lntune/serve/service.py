"""`ServingService`: what each endpoint does, between the HTTP layer and the worker.

A request is checked (task, options, input sizes), its adapter found in the catalog (404/400 before
anything is queued), its texts tokenized (here, on the event loop: the worker only pads), then queued as
one work item per text; the response is built from the items' results.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

from lntune.loading import load_tokenizer
from lntune.serve.batcher import Batcher, WorkItem
from lntune.serve.catalog import AdapterCatalog, AdapterSource, label_names
from lntune.serve.config import ServeConfig
from lntune.serve.engine import Engine, Sampling
from lntune.serve.errors import APIError, bad_request
from lntune.serve.metrics import ServerMetrics
from lntune.serve.pooling import read_pooling
from lntune.serve.registry import AdapterRegistry
from lntune.serve.schemas import (
    AdapterLoadRequest,
    AdapterStatus,
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
)
from lntune.tasks import TASKS, task_named

_MAX_STOP = 4


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos]


class ServingService:
    """The server's state (catalog, resident adapters, worker) and one method per endpoint.

    Args:
        config: The server's settings.
        tokenizer: The base model's tokenizer (with a pad token).
        engine: The models.
        metrics: Where metrics go (a new registry by default).

    Example:
        >>> service = ServingService.from_config(config, tokenizer)
        >>> service.start()
        >>> (await service.embeddings(EmbeddingRequest(model="my-adapter", input="hello"))).data[0].index
        0
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
        self.created = int(time.time())

    @classmethod
    def from_config(cls, config: ServeConfig, tokenizer=None) -> ServingService:
        """Load the base model (and, unless given, the tokenizer) for ``config``; adapters load on first use."""
        tokenizer = tokenizer or load_tokenizer(config.model_path)
        pooling = read_pooling(config.model_path) if task_named(config.task).embeds else None
        engine = Engine(config.model_path, config.task, tokenizer.pad_token_id, _eos_ids(tokenizer), pooling)
        return cls(config, tokenizer, engine)

    def start(self) -> None:
        """Start the worker thread."""
        self.batcher.start()

    def stop(self) -> None:
        """Finish queued work and stop the worker thread."""
        self.batcher.stop()

    # --------------------------------------------------------------------------- endpoints
    def models(self) -> ModelList:
        """``GET /v1/models``: the base model, then every adapter that can be served."""
        base = self.config.model_id
        cards = [ModelCard(id=base, created=self.created, root=base)]
        cards += [ModelCard(id=n, created=self.created, root=base, parent=base) for n in self.catalog.names()]
        return ModelList(data=cards)

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """``POST /v1/embeddings``: one pooled embedding per input."""
        self._require_endpoint("/v1/embeddings")
        if request.dimensions is not None:
            raise bad_request("dimensions is not supported: embeddings have the model's size.", param="dimensions")
        source = self.catalog.resolve(request.model)
        ids = self._tokenize(self._texts(request.input, "input"), "input")
        vectors = await self._run(source, ids)
        data = [EmbeddingData(index=i, embedding=_encode(v, request.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(x) for x in ids)
        return EmbeddingResponse(data=data, model=request.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        """``POST /v1/classify``: class probabilities and the most likely label per input."""
        self._require_endpoint("/v1/classify")
        source = self.catalog.resolve(request.model)
        if source is None and not self.engine.base_has_head:
            raise bad_request(
                f"The base model '{request.model}' has no trained classification head (its folder has none); "
                "name an adapter in 'model' (GET /v1/models lists them).",
                param="model",
                code="no_classification_head",
            )
        ids = self._tokenize(self._texts(request.input, "input"), "input")
        all_probs = await self._run(source, ids)
        data = []
        for i, probs in enumerate(all_probs):
            labels = label_names(len(probs), self.engine.base_labels, source and source.labels)
            label = labels[int(probs.argmax())]
            data.append(ClassifyData(index=i, label=label, probs=probs.tolist(), num_classes=len(probs)))
        tokens = sum(len(x) for x in ids)
        return ClassifyResponse(
            id=f"classify-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            data=data,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def completions(self, request: CompletionRequest) -> CompletionResponse:
        """``POST /v1/completions``: one completion per prompt (greedy at temperature 0)."""
        self._require_endpoint("/v1/completions")
        sampling, max_tokens, stops = self._completion_options(request)
        source = self.catalog.resolve(request.model)
        ids = self._tokenize(self._texts(request.prompt, "prompt"), "prompt")
        outputs = await self._run(source, ids, sampling, max_tokens)
        choices, generated = [], 0
        for i, (tokens, ended) in enumerate(outputs):
            generated += len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
            if cut >= 0:
                text, ended = text[:cut], True
            choices.append(CompletionChoice(text=text, index=i, finish_reason="stop" if ended else "length"))
        prompt = sum(len(x) for x in ids)
        usage = CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model, choices=choices, usage=usage
        )

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
    def _require_endpoint(self, endpoint: str) -> None:
        if endpoint not in self.task.endpoints:
            serving = next(name for name, task in TASKS.items() if endpoint in task.endpoints)
            raise bad_request(
                f"This server serves {self.task.name} ({', '.join(self.task.endpoints)}); start lntune "
                f"serve --task {serving} for {endpoint}.",
                code="wrong_endpoint",
            )

    def _texts(self, value: str | list[str], param: str) -> list[str]:
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

    def _tokenize(self, texts: list[str], param: str) -> list[list[int]]:
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

    def _completion_options(self, request: CompletionRequest) -> tuple[Sampling, int, list[str]]:
        refused = {
            "n": request.n not in (None, 1),
            "stream": bool(request.stream),
            "echo": bool(request.echo),
            "logprobs": request.logprobs is not None,
            "best_of": request.best_of not in (None, 1),
            "seed": request.seed is not None,
            "suffix": request.suffix is not None,
            "presence_penalty": bool(request.presence_penalty),
            "frequency_penalty": bool(request.frequency_penalty),
            "logit_bias": bool(request.logit_bias),
        }
        for name, bad in refused.items():
            if bad:
                raise bad_request(
                    f"{name} is not supported by lntune serve (one completion per prompt, no streaming, no "
                    "logprobs, no penalties, no per-request seed); leave it unset.",
                    param=name,
                    code="unsupported_parameter",
                )
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        if not 0 <= temperature <= 2:
            raise bad_request(f"temperature must be between 0 and 2, got {temperature}.", param="temperature")
        if not 0 < top_p <= 1:
            raise bad_request(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        if not 1 <= max_tokens <= self.config.max_length:
            raise bad_request(
                f"max_tokens must be between 1 and --max-length {self.config.max_length}, got {max_tokens}.",
                param="max_tokens",
            )
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > _MAX_STOP or not all(stops):
            raise bad_request(f"stop takes at most {_MAX_STOP} non-empty strings.", param="stop")
        sampling = Sampling() if temperature == 0 else Sampling(temperature, top_p)
        return sampling, max_tokens, stops

    async def _run(
        self, source: AdapterSource | None, ids: list[list[int]], sampling: Sampling | None = None, budget: int = 0
    ) -> list:
        loop = asyncio.get_running_loop()
        return await self.batcher.submit([WorkItem(source, x, loop.create_future(), sampling, budget) for x in ids])


def _encode(vector, encoding_format: str) -> list[float] | str:
    """An embedding as floats, or as base64 of little-endian float32 (what OpenAI's client asks for)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
