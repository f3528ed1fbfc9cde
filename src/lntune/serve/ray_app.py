"""Scaling out with Ray Serve: replicas of ``lntune serve``, with model multiplexing routing adapters.

Each replica holds the base model and serves the same HTTP API as ``lntune serve`` (the same FastAPI
app, called in process, its response streamed back: server-sent events of chat completions arrive token
by token). A client names the adapter in the header ``serve_multiplexed_model_id`` (as well as in
``model``); Ray Serve sends the request preferably to a replica that already holds that adapter, and the
replica's ``@serve.multiplexed`` loader loads it there on first use. Beyond ``max_adapters_per_replica``
Ray unloads the least recently used one from the replica: Ray's multiplexing calls the loaded object's
``__del__`` when it evicts it (its documented way to free a model), which unloads the adapter once its
requests in flight are done.

Run (needs the ``ray`` extra)::

    serve run lntune.serve.ray_app:app_builder adapters=/path/to/adapters num_replicas=2

Every ``lntune serve`` option can be given the same way without its dashes (``max-batch-size=32``,
``task=seq-cls``, ``model=/path/to/model``); ``num_replicas`` and ``max_adapters_per_replica`` (default 64)
configure Ray.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lntune.serve.app import create_app
from lntune.serve.config import ServeConfig
from lntune.serve.errors import APIError
from lntune.serve.service import ServingService

_RAY_OPTIONS = {"num_replicas": 1, "max_adapters_per_replica": 64}
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


class AdapterHandle:
    """What the multiplexed loader returns for one adapter: unloads it from the replica when Ray drops it."""

    def __init__(self, service: ServingService, name: str) -> None:
        self.service = service
        self.name = name
        self._released = False

    def __del__(self) -> None:
        # Ray calls this when it evicts the adapter from the replica (and the garbage collector once more).
        if not self._released:
            self._released = True
            self.service.batcher.post(lambda: self.service.registry.remove(self.name))


class LNTuneReplica:
    """One replica: the service, its app, and the per-request routing through the multiplexed loader."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.service = ServingService.from_config(ServeConfig.resolve(**options))
        self.service.start()
        self.app = create_app(self.service)

    async def load_adapter(self, adapter_id: str) -> AdapterHandle:
        """Make ``adapter_id`` resident in this replica (the body of the ``@serve.multiplexed`` loader)."""
        source = self.service.catalog.resolve(adapter_id)
        if source is not None:
            failures = await self.service.batcher.call(lambda: self.service.registry.prepare([source]))
            if failures:
                raise failures[adapter_id]
        return AdapterHandle(self.service, adapter_id)

    async def __call__(self, request: Request) -> Response:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            try:
                await self.adapter(adapter_id)
            except APIError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
        return await asgi_response(self.app, request)

    def __del__(self) -> None:
        self.service.stop()


async def asgi_response(app, request: Request) -> Response:
    """``app``'s response to ``request``, streamed: the app runs in a task whose body chunks are passed on as they come.

    Args:
        app: An ASGI app (the replica's FastAPI app).
        request: The request Ray Serve handed to the replica.

    Returns:
        A streaming response with the app's status and headers.
    """
    body = await request.body()
    scope = {**request.scope, "root_path": "", "headers": [h for h in request.scope["headers"] if h[0] != b"host"]}
    scope["headers"].append((b"host", b"replica"))
    chunks: asyncio.Queue = asyncio.Queue()
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays; a disconnect comes as a cancellation of the task
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            started.set_result(message)
        elif message["type"] == "http.response.body":
            await chunks.put(message.get("body", b""))
            if not message.get("more_body", False):
                await chunks.put(None)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            if not started.done():
                started.set_exception(RuntimeError("the replica's app sent no response"))
            await chunks.put(None)

    task = asyncio.create_task(run())
    start = await started
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"] if k.lower() not in _HOP_HEADERS}

    async def stream():
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
        finally:
            task.cancel()  # the client went away (or the body ended): stop the app's work for it

    return StreamingResponse(stream(), status_code=start["status"], headers=headers)


def build_deployment(max_adapters_per_replica: int, num_replicas: int = 1):
    """The Ray Serve deployment class, with Ray's per-replica adapter limit and replica count.

    Example:
        >>> app = build_deployment(64, num_replicas=2).bind({"adapters": "/path/to/adapters"})
        >>> serve.run(app)
    """

    @serve.deployment(num_replicas=num_replicas)
    class LNTuneDeployment(LNTuneReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def adapter(self, adapter_id: str) -> AdapterHandle:
            return await self.load_adapter(adapter_id)

    return LNTuneDeployment


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Ray Serve application for ``serve run lntune.serve.ray_app:app_builder key=value ...``.

    Args:
        args: ``lntune serve`` options without dashes (``adapters``, ``model``, ``task``, ``max-batch-size``...),
            plus ``num_replicas`` and ``max_adapters_per_replica``.

    Returns:
        An application for ``serve.run``.

    Example:
        >>> serve.run(app_builder({"adapters": "/path/to/adapters", "max_adapters_per_replica": 8}))
    """
    options = {key.replace("-", "_"): value for key, value in args.items()}
    ray_options = {key: int(options.pop(key, default)) for key, default in _RAY_OPTIONS.items()}
    options.setdefault("max_resident", 2 * ray_options["max_adapters_per_replica"])  # Ray's limit decides
    deployment = build_deployment(ray_options["max_adapters_per_replica"], ray_options["num_replicas"])
    return deployment.bind(options)
