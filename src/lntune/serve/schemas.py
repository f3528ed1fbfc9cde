"""Request and response bodies (pydantic): OpenAI's shapes, vLLM's for ``/v1/classify`` and ``/v1/score``, and
Cohere's (as Jina, Infinity and vLLM take it) for ``/v1/rerank``; TEI's ``truncate`` and ``truncation_direction``.

Requests are strict (a number where text belongs is refused, not converted); unknown fields are ignored,
as OpenAI's clients send some that do not apply here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Truncation(_Request):
    """TEI's options: cut inputs longer than the adapter's limit (default here: yes, as training and ``lntune
    eval`` did), on the right (as training) or on the left."""

    truncate: bool = True
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"

    def model_post_init(self, context) -> None:
        self.truncation_direction = self.truncation_direction.lower()  # TEI writes "Right" / "Left"


class EmbeddingRequest(_Truncation):
    """``POST /v1/embeddings``: OpenAI's request (token-id inputs are not supported)."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class ClassifyRequest(_Truncation):
    """``POST /v1/classify``: vLLM's request."""

    model: str
    input: str | list[str]
    user: str | None = None


class RerankRequest(_Truncation):
    """``POST /v1/rerank``: Cohere's request (``top_n`` None or 0: every document; ``use_activation``: vLLM's
    option, the sigmoid of a cross-encoder's logit instead of the logit)."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    use_activation: bool = False
    user: str | None = None


class ScoreRequest(_Truncation):
    """``POST /v1/score``: vLLM's request, ``text_1`` and ``text_2`` (or ``queries`` and ``documents``)."""

    model: str
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    use_activation: bool = False
    user: str | None = None


class CompletionRequest(_Request):
    """``POST /v1/completions``: OpenAI's request; options this server does not have are refused when set."""

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    seed: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class AdapterLoadRequest(_Request):
    """``POST /v1/adapters``: load (or replace) adapter ``name`` from ``path`` inside ``--adapters``."""

    name: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1, max_length=4096)


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: Usage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lntune"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterStatus(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    path: str | None = None
    resident: bool


class StreamOptions(_Request):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage (and no choices)."""

    include_usage: bool | None = False


class ChatContentPart(_Request):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    """One message of a conversation (``content``: a string, or text parts)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: OpenAI's request; options this server does not have are refused when set."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: str | list[str] | None = None
    n: int | None = 1
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    user: str | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class LoRALoadRequest(_Request):
    """vLLM's ``POST /v1/load_lora_adapter``: load the adapter folder ``lora_path`` as ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=255)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class LoRAUnloadRequest(_Request):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(min_length=1, max_length=255)
    lora_int_id: int | None = None
