"""The generation endpoint ``POST /v1/completions``: options checked, prompts queued, completions decoded."""

from __future__ import annotations

import time
import uuid

from lntune.serve.config import ServeConfig
from lntune.serve.engine import Sampling
from lntune.serve.errors import bad_request
from lntune.serve.schemas import CompletionChoice, CompletionRequest, CompletionResponse, CompletionUsage
from lntune.serve.service import ServingService

_MAX_STOP = 4


async def completions(service: ServingService, request: CompletionRequest) -> CompletionResponse:
    """``POST /v1/completions``: one completion per prompt (greedy at temperature 0)."""
    service.require_endpoint("/v1/completions")
    sampling, max_tokens, stops = completion_options(service.config, request)
    source = service.catalog.resolve(request.model)
    ids = service.tokenize(service.texts(request.prompt, "prompt"), "prompt")
    outputs = await service.run(source, ids, sampling, max_tokens)
    choices, generated = [], 0
    for i, (tokens, ended) in enumerate(outputs):
        generated += len(tokens)
        text = service.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        choices.append(CompletionChoice(text=text, index=i, finish_reason="stop" if ended else "length"))
    prompt = sum(len(x) for x in ids)
    usage = CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model, choices=choices, usage=usage
    )


def completion_options(config: ServeConfig, request: CompletionRequest) -> tuple[Sampling, int, list[str]]:
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
    if not 1 <= max_tokens <= config.max_length:
        raise bad_request(
            f"max_tokens must be between 1 and --max-length {config.max_length}, got {max_tokens}.",
            param="max_tokens",
        )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > _MAX_STOP or not all(stops):
        raise bad_request(f"stop takes at most {_MAX_STOP} non-empty strings.", param="stop")
    sampling = Sampling() if temperature == 0 else Sampling(temperature, top_p)
    return sampling, max_tokens, stops
