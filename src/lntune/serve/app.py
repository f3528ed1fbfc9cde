"""The FastAPI app of ``lntune serve``: routes, OpenAI-style errors, API key, body-size limit, metrics.

Endpoints: ``GET /health``, ``GET /ready``, ``GET /info``, ``GET /v1/models``, ``POST /v1/embeddings``,
``POST /v1/classify``, ``POST /v1/rerank`` (also ``/rerank``, ``/v2/rerank``), ``POST /v1/score`` (also
``/score``), ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, ``GET /metrics``.
With an API key, every request needs ``Authorization: Bearer <key>`` except the probes (``/health``,
``/ready``) and ``/metrics``, which stay open for orchestrators and scrapers. Until the model is loaded
(and while stopping) every request but the probes, ``/info`` and ``/metrics`` gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lntune.serve import completions as generation
from lntune.serve import encoders
from lntune.serve.errors import APIError
from lntune.serve.schemas import (
    AdapterLoadRequest,
    AdapterStatus,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    LoRALoadRequest,
    LoRAUnloadRequest,
    ModelList,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from lntune.serve.service import ServingService

_ENDPOINTS = {
    "/health",
    "/ready",
    "/info",
    "/metrics",
    "/v1/models",
    "/v1/embeddings",
    "/v1/classify",
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/score",
    "/score",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/adapters",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}
_HTTP_TYPES = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error"}

#: Paths that need no API key: liveness and readiness probes, and the Prometheus scrape.
_OPEN_PATHS = {"/health", "/ready", "/metrics"}

#: Paths answered while the model loads (or the server stops): the probes, ``/info`` and ``/metrics``.
_ALWAYS_PATHS = _OPEN_PATHS | {"/info"}


def endpoint_label(path: str) -> str:
    """The metrics label of a request path (unknown paths share one label, so labels stay few)."""
    if path in _ENDPOINTS:
        return path
    return "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other"


class _PayloadTooLarge(HTTPException):
    """Raised while reading a body past the limit (a FastAPI HTTPException, so it is not turned into a 400)."""


def _error_response(error: APIError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


class GuardMiddleware:
    """ASGI middleware: API key, body-size limit, and the request metrics of every endpoint.

    Args:
        app: The ASGI app to guard.
        service: The service (its config has the key and the limit; its metrics are updated).
    """

    def __init__(self, app, service: ServingService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, config = self.service.metrics, self.service.config
        endpoint, start, status = endpoint_label(scope["path"]), time.perf_counter(), 500

        async def send_recording(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > config.max_body_bytes:
                raise _PayloadTooLarge(413, f"The request body is larger than {config.max_body_bytes} bytes.")
            return message

        try:
            error = self._refusal(scope)
            if error is not None:
                await _error_response(error)(scope, receive, send_recording)
            else:
                await self.app(scope, receive_limited, send_recording)
        finally:
            metrics.requests.labels(endpoint=endpoint).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
            if status >= 400:
                metrics.errors.labels(endpoint=endpoint, status=str(status)).inc()

    def _refusal(self, scope) -> APIError | None:
        config = self.service.config
        headers = dict(scope["headers"])
        if config.api_key and scope["path"] not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
                return APIError(
                    401,
                    "Missing or incorrect API key: send the header 'Authorization: Bearer <key>' with the key the "
                    "server was started with (--api-key or LNTUNE_API_KEY).",
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return APIError(413, f"The request body is larger than {config.max_body_bytes} bytes.")
        if scope["path"] not in _ALWAYS_PATHS:
            try:
                self.service.require_ready()
            except APIError as exc:
                return exc
        return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the first field at fault."""
    parts, param = [], None
    for error in exc.errors():
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}.", None
        field = ".".join(location) or "body"
        param = param or (location[0] if location else None)
        parts.append(f"{field}: {error['msg']}")
    return "Invalid request: " + "; ".join(dict.fromkeys(parts)) + ".", param


def create_app(service: ServingService) -> FastAPI:
    """The ASGI app serving ``service``; its lifespan starts and stops the worker thread.

    Example:
        >>> import uvicorn
        >>> uvicorn.run(create_app(ServingService.from_config(config, tokenizer)), host="127.0.0.1", port=8000)
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="lntune serve", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, service=service)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        error_type = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return _error_response(APIError(exc.status_code, message, type=error_type))

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the process answers (whether or not the model is loaded yet)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded (and ``--preload`` done); 503 before, and while stopping."""
        if service.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": service.state}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/info")
    async def info() -> dict:
        return service.info()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return service.models()

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(request: EmbeddingRequest) -> EmbeddingResponse:
        return await encoders.embeddings(service, request)

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        return await encoders.classify(service, request)

    @app.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
    @app.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True, include_in_schema=False)
    @app.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True, include_in_schema=False)
    async def rerank(request: RerankRequest) -> RerankResponse:
        return await encoders.rerank(service, request)

    @app.post("/v1/score", response_model=ScoreResponse)
    @app.post("/score", response_model=ScoreResponse, include_in_schema=False)
    async def score(request: ScoreRequest) -> ScoreResponse:
        return await encoders.score(service, request)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: CompletionRequest, http: Request) -> Response:
        return await generation.completions(service, request, http)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        return await generation.chat_completions(service, request, http)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoRALoadRequest) -> str:
        return await service.load_lora_adapter(request)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: LoRAUnloadRequest) -> str:
        return await service.unload_lora_adapter(request)

    @app.post("/v1/adapters", response_model=AdapterStatus)
    async def load_adapter(request: AdapterLoadRequest) -> AdapterStatus:
        return await service.load_adapter(request)

    @app.delete("/v1/adapters/{name}", response_model=AdapterStatus)
    async def unload_adapter(name: str) -> AdapterStatus:
        return await service.unload_adapter(name)

    return app
