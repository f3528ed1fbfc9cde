"""The generation endpoints, ``POST /v1/completions`` and ``POST /v1/chat/completions``, in OpenAI's shapes.

A request's options are checked, its adapter resolved, made resident and pinned (it stays loaded while the
request runs), its prompt tokenized (a chat through the tokenizer's chat template), then each choice runs in
the generation engine (`lntune.serve.generation`: continuous batching, one adapter per request) or, where
that engine is not available, in a static ``generate`` batch. With ``stream: true`` the answer goes out as
server-sent events in OpenAI's chunk format as the tokens come, ending with ``data: [DONE]``; a client that
goes away cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lntune.serve.catalog import AdapterSource
from lntune.serve.config import ServeConfig
from lntune.serve.engine import Sampling
from lntune.serve.errors import APIError, bad_request
from lntune.serve.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
)
from lntune.serve.service import ServingService

_MAX_STOP = 4
_MAX_CHOICES = 16
_DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class GenerationOptions:
    """A request's generation settings, checked."""

    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Event:
    """One step of one choice: new text, and how the choice ended (None while it runs)."""

    index: int
    text: str
    finish: str | None
    tokens: int  # tokens generated so far by this choice


# ------------------------------------------------------------------------------------------- endpoints
async def completions(service: ServingService, request: CompletionRequest, http: Request) -> Response:
    """``POST /v1/completions``: ``n`` completions per prompt (greedy at temperature 0), streamed or not."""
    service.require_endpoint("/v1/completions")
    refuse_unsupported(
        request,
        {"echo": bool(request.echo), "logprobs": request.logprobs is not None, "suffix": request.suffix is not None},
    )
    if request.best_of not in (None, 1, request.n):
        raise bad_request("best_of is not supported (use n).", param="best_of", code="unsupported_parameter")
    source = service.catalog.resolve(request.model)
    prompts = service.tokenize(service.texts(request.prompt, "prompt"), "prompt")
    options = generation_options(service.config, request, request.max_tokens, prompts)
    events = answers(service, source, prompts, options)
    created, answer_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    prompt_tokens = sum(len(p) for p in prompts)

    def chunk(event: Event) -> dict:
        choice = {"index": event.index, "text": event.text, "logprobs": None, "finish_reason": event.finish}
        return {"id": answer_id, "object": "text_completion", "created": created, "model": request.model,
                "choices": [choice]}  # fmt: skip

    if options.stream:
        return _sse(service, events, lambda event: [chunk(event)], options, prompt_tokens, answer_id, created, request)
    texts, finishes, generated = await _collect(service, events, http)
    choices = [CompletionChoice(text=texts[i], index=i, finish_reason=finishes[i]) for i in sorted(texts)]
    usage = _usage(prompt_tokens, generated)
    body = CompletionResponse(id=answer_id, created=created, model=request.model, choices=choices, usage=usage)
    return JSONResponse(body.model_dump())


async def chat_completions(service: ServingService, request: ChatCompletionRequest, http: Request) -> Response:
    """``POST /v1/chat/completions``: the conversation through the tokenizer's chat template, ``n`` answers."""
    service.require_endpoint("/v1/chat/completions")
    refuse_unsupported(
        request,
        {
            "logprobs": bool(request.logprobs),
            "top_logprobs": request.top_logprobs is not None,
            "tools": bool(request.tools),
            "tool_choice": request.tool_choice not in (None, "none"),
            "response_format": request.response_format not in (None, {"type": "text"}),
        },
    )
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise bad_request("Give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens")
    source = service.catalog.resolve(request.model)
    prompt = chat_prompt(service, request)
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    options = generation_options(service.config, request, max_tokens, [prompt])
    events = answers(service, source, [prompt], options)
    created, answer_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    started: set[int] = set()

    def chunks(event: Event) -> list[dict]:
        out = []
        if event.index not in started:  # each choice opens with the assistant's role
            started.add(event.index)
            out.append(
                _chat_chunk(answer_id, created, request.model, event.index, {"role": "assistant", "content": ""})
            )
        if event.text:
            out.append(_chat_chunk(answer_id, created, request.model, event.index, {"content": event.text}))
        if event.finish:
            out.append(_chat_chunk(answer_id, created, request.model, event.index, {}, event.finish))
        return out

    if options.stream:
        return _sse(service, events, chunks, options, len(prompt), answer_id, created, request)
    texts, finishes, generated = await _collect(service, events, http)
    choices = [
        ChatChoice(index=i, message=ChatResponseMessage(content=texts[i]), finish_reason=finishes[i])
        for i in sorted(texts)
    ]
    body = ChatCompletionResponse(
        id=answer_id, created=created, model=request.model, choices=choices, usage=_usage(len(prompt), generated)
    )
    return JSONResponse(body.model_dump())


# ----------------------------------------------------------------------------------------- options
def refuse_unsupported(request, refused: dict[str, bool]) -> None:
    """400 for an option this server does not have, when the request sets it (penalties and logit_bias too)."""
    refused = {
        **refused,
        "presence_penalty": bool(request.presence_penalty),
        "frequency_penalty": bool(request.frequency_penalty),
        "logit_bias": bool(request.logit_bias),
    }
    for name, bad in refused.items():
        if bad:
            raise bad_request(
                f"{name} is not supported by lntune serve (no logprobs, penalties, logit_bias, tools or "
                "structured output); leave it unset.",
                param=name,
                code="unsupported_parameter",
            )


def generation_options(
    config: ServeConfig, request, max_tokens: int | None, prompts: list[list[int]]
) -> GenerationOptions:
    """The checked generation settings of a completion or chat request.

    ``max_tokens`` defaults to 16 for completions (as OpenAI's) and, for a chat, to what the context has
    left; prompt plus answer must fit ``--max-length`` tokens.
    """
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be between 0 and 2, got {temperature}.", param="temperature")
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    if request.seed is not None and temperature > 0:
        raise bad_request(
            "seed is not supported with temperature > 0: under continuous batching, draws depend on the other "
            "requests in each step. Use temperature 0 for reproducible answers.",
            param="seed",
            code="unsupported_parameter",
        )
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = 16 if isinstance(request, CompletionRequest) else config.max_length - longest
    if max_tokens < 1 or longest + max_tokens > config.max_length:
        raise bad_request(
            f"This model's context is --max-length {config.max_length} tokens: the prompt has {longest} and "
            f"max_tokens is {max_tokens}; ask for fewer tokens (at least 1) or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > _MAX_STOP or not all(stops):
        raise bad_request(f"stop takes at most {_MAX_STOP} non-empty strings.", param="stop")
    n = 1 if request.n is None else request.n
    if not 1 <= n <= _MAX_CHOICES or n * len(prompts) > config.max_inputs:
        raise bad_request(
            f"n must be from 1 to {_MAX_CHOICES}, and n x prompts at most {config.max_inputs}.", param="n"
        )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options needs stream: true.", param="stream_options")
    sampling = Sampling() if temperature == 0 else Sampling(temperature, top_p)
    return GenerationOptions(sampling, max_tokens, tuple(stops), n, bool(request.stream), include_usage)


def chat_prompt(service: ServingService, request: ChatCompletionRequest) -> list[int]:
    """The conversation's token ids: the tokenizer's chat template with the generation prompt, nothing added."""
    tokenizer = service.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            f"The model '{service.config.model_id}' has no chat template (its tokenizer_config.json defines none); "
            "use /v1/completions, or serve a model whose tokenizer has a chat template.",
            param="messages",
            code="no_chat_template",
        )
    if not request.messages:
        raise bad_request("messages must not be empty.", param="messages")
    messages = []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported.", param="messages")
            content = "".join(part.text for part in content)
        messages.append({"role": message.role, "content": content or ""})
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # a template may raise anything (jinja errors, its own raise_exception)
        raise bad_request(f"The chat template refused these messages: {exc}", param="messages") from None
    if len(ids) > service.config.max_length:
        raise bad_request(
            f"The conversation has {len(ids)} tokens, more than --max-length {service.config.max_length}.",
            param="messages",
            code="context_length_exceeded",
        )
    return list(ids)


# ------------------------------------------------------------------------------------------- running
class TextStream:
    """The text of a growing token list, released only when it is final: stop strings cut it, and text that could
    still become a stop string (or an unfinished UTF-8 character) is held back until it is known.

    Example:
        >>> stream = TextStream(tokenizer, ("\\n\\n",))
        >>> stream.feed([101, 102], final=False)
        ('Hello', False)
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.sent = ""

    def feed(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """New text for ``tokens`` (all the tokens so far), and whether a stop string ended it."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [position for position in (text.find(s) for s in self.stops) if position >= 0]
        stopped = bool(cuts)
        if stopped:
            text, final = text[: min(cuts)], True
        if not final:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
            for keep in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(text[-keep:]) for s in self.stops):
                    text = text[:-keep]
                    break
        if not text.startswith(self.sent):  # the decoding of earlier tokens changed: wait until it settles
            return "", stopped
        delta, self.sent = text[len(self.sent) :], text
        return delta, stopped


async def answers(
    service: ServingService, source: AdapterSource | None, prompts: list[list[int]], options: GenerationOptions
) -> AsyncIterator[Event]:
    """The events of every choice (``n`` per prompt, numbered prompt by prompt), as they come."""
    choices = [prompt for prompt in prompts for _ in range(options.n)]
    if service.generation is None:
        async for event in _static_answers(service, source, choices, options):
            yield event
        return
    async with service.adapter_in_use(source) as adapter:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(_run_choice(service, i, prompt, adapter, options, queue))
            for i, prompt in enumerate(choices)
        ]
        try:
            running = len(tasks)
            while running:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                running -= event.finish is not None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _run_choice(service, index, prompt, adapter, options: GenerationOptions, queue: asyncio.Queue) -> None:
    stream = TextStream(service.tokenizer, options.stops)
    sampling = options.sampling
    try:
        generation = service.generation.generate(
            prompt, adapter, options.max_tokens, sampling.temperature, sampling.top_p
        )
        async with contextlib.aclosing(generation) as completions_so_far:
            async for completion in completions_so_far:
                delta, stopped = stream.feed(completion.tokens, final=completion.finish is not None)
                finish = "stop" if stopped else completion.finish
                if delta or finish:
                    queue.put_nowait(Event(index, delta, finish, len(completion.tokens)))
                if finish:
                    return  # leaving the iteration cancels a request a stop string ended
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the response
        queue.put_nowait(exc)


async def _static_answers(service, source, choices, options: GenerationOptions) -> AsyncIterator[Event]:
    """Without the continuous-batching engine: one static ``generate`` batch, each answer in one event."""
    outputs = await service.run(source, choices, options.sampling, options.max_tokens)
    for i, (tokens, ended) in enumerate(outputs):
        text, stopped = TextStream(service.tokenizer, options.stops).feed(tokens, final=True)
        yield Event(i, text, "stop" if ended or stopped else "length", len(tokens))


async def _collect(service: ServingService, events: AsyncIterator[Event], http: Request):
    """Every choice's text, finish reason and the tokens generated; a client that goes away cancels the request."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    tokens: dict[int, int] = {}

    async def gather() -> None:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                texts[event.index] = texts.get(event.index, "") + event.text
                tokens[event.index] = event.tokens
                if event.finish:
                    finishes[event.index] = event.finish

    work = asyncio.create_task(gather())
    with service.metrics_running():
        while True:
            done, _ = await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if done:
                work.result()
                return texts, finishes, sum(tokens.values())
            if await http.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise APIError(499, "The client closed the request.", type="invalid_request_error")


def _sse(
    service: ServingService,
    events: AsyncIterator[Event],
    chunks: Callable[[Event], list[dict]],
    options: GenerationOptions,
    prompt_tokens: int,
    answer_id: str,
    created: int,
    request,
) -> StreamingResponse:
    """Server-sent events: the chunks of each event, then the usage chunk (if asked for), then ``[DONE]``."""

    async def body() -> AsyncIterator[str]:
        tokens: dict[int, int] = {}
        with service.metrics_running():
            try:
                async with contextlib.aclosing(events) as stream:
                    async for event in stream:
                        tokens[event.index] = event.tokens
                        for chunk in chunks(event):
                            if options.include_usage:
                                chunk["usage"] = None
                            yield _data(chunk)
            except APIError as exc:
                yield _data(exc.body())
                yield "data: [DONE]\n\n"
                return
            if options.include_usage:
                usage = _usage(prompt_tokens, sum(tokens.values())).model_dump()
                kind = "chat.completion.chunk" if answer_id.startswith("chatcmpl") else "text_completion"
                yield _data(
                    {
                        "id": answer_id,
                        "object": kind,
                        "created": created,
                        "model": request.model,
                        "choices": [],
                        "usage": usage,
                    }  # fmt: skip
                )
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat_chunk(answer_id: str, created: int, model: str, index: int, delta: dict, finish: str | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
