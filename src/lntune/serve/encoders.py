"""The encoder endpoints: ``POST /v1/embeddings``, ``POST /v1/classify``, ``POST /v1/rerank`` and ``POST /v1/score``.

Each function checks a request, finds its adapter in the catalog (404/400 before anything is queued),
tokenizes its texts as the adapter was trained (`ServingService.encode`: truncated at its recorded
``max_length`` unless the request says ``truncate: false``), queues one work item per input on the service's
batcher, and builds the response.

Rerank and score work on both encoder tasks: for ``seq-cls`` the adapter must have a one-output head (a
cross-encoder): a (query, document) pair is tokenized as a text pair and its score is the head's logit (with
``use_activation``: its sigmoid); for ``feature-extraction`` the score is the cosine similarity of the two
texts' pooled embeddings.
"""

from __future__ import annotations

import base64
import time
import uuid

import torch
import torch.nn.functional as F

from lntune.serve.catalog import AdapterSource, label_names
from lntune.serve.errors import bad_request
from lntune.serve.schemas import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from lntune.serve.service import Encoded, ServingService


async def embeddings(service: ServingService, request: EmbeddingRequest) -> EmbeddingResponse:
    """``POST /v1/embeddings``: one pooled embedding per input (``dimensions``: its first ones, re-normalized)."""
    service.require_endpoint("/v1/embeddings")
    size = service.engine.embedding_size
    if request.dimensions is not None and not 1 <= request.dimensions <= (size or request.dimensions):
        raise bad_request(
            f"dimensions must be between 1 and the model's embedding size {size}, got {request.dimensions}.",
            param="dimensions",
        )
    source = service.catalog.resolve(request.model)
    texts = service.texts(request.input, "input")
    encoded = service.encode(source, texts, "input", request.truncate, request.truncation_direction)
    vectors = await service.run_encoded([(source, e) for e in encoded])
    if request.dimensions is not None:  # Matryoshka: the first dimensions, then unit length again
        vectors = [F.normalize(v[: request.dimensions], dim=0) for v in vectors]
    data = [EmbeddingData(index=i, embedding=_encode(v, request.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=request.model, usage=_usage(encoded))


async def classify(service: ServingService, request: ClassifyRequest) -> ClassifyResponse:
    """``POST /v1/classify``: class probabilities and the most likely label per input."""
    service.require_endpoint("/v1/classify")
    source = service.catalog.resolve(request.model)
    _require_head(service, source, request.model)
    texts = service.texts(request.input, "input")
    encoded = service.encode(source, texts, "input", request.truncate, request.truncation_direction)
    all_logits = await service.run_encoded([(source, e) for e in encoded])
    data = []
    for i, logits in enumerate(all_logits):
        probs = logits.softmax(dim=-1)
        labels = label_names(len(probs), service.engine.base_labels, source and source.labels)
        label = labels[int(probs.argmax())]
        data.append(ClassifyData(index=i, label=label, probs=probs.tolist(), num_classes=len(probs)))
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model,
        data=data,
        usage=_usage(encoded),
    )


async def rerank(service: ServingService, request: RerankRequest) -> RerankResponse:
    """``POST /v1/rerank`` (also ``/rerank``, ``/v2/rerank``): the documents sorted by relevance to the query."""
    service.require_endpoint("/v1/rerank")
    if request.top_n is not None and request.top_n < 0:
        raise bad_request(f"top_n must not be negative, got {request.top_n}.", param="top_n")
    source = service.catalog.resolve(request.model)
    if not request.query:
        raise bad_request("query must not be empty.", param="query")
    documents = service.texts(request.documents, "documents")
    scores, encoded = await _scores(service, source, request, [request.query] * len(documents), documents)
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    if request.top_n:
        order = order[: request.top_n]
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i],
            document=RerankDocument(text=documents[i]) if request.return_documents else None,
        )
        for i in order
    ]
    return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=request.model, results=results, usage=_usage(encoded))


async def score(service: ServingService, request: ScoreRequest) -> ScoreResponse:
    """``POST /v1/score`` (also ``/score``), vLLM's: a score per pair of ``text_1`` and ``text_2`` (or ``queries``
    and ``documents``): one text against each of a list, or two lists of the same length pairwise."""
    service.require_endpoint("/v1/score")
    first, second, names = _score_sides(request)
    source = service.catalog.resolve(request.model)
    left, right = service.texts(first, names[0]), service.texts(second, names[1])
    if len(left) == 1 and len(right) > 1:
        left = left * len(right)
    if len(left) != len(right):
        raise bad_request(
            f"{names[0]} has {len(left)} texts and {names[1]} {len(right)}: give one {names[0]} text, or as many as "
            f"{names[1]} (scored pairwise).",
            param=names[1],
        )
    scores, encoded = await _scores(service, source, request, left, right)
    data = [ScoreData(index=i, score=value) for i, value in enumerate(scores)]
    return ScoreResponse(
        id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=request.model, data=data, usage=_usage(encoded)
    )


def _score_sides(request: ScoreRequest) -> tuple:
    """The two sides of a score request: ``text_1``/``text_2`` (vLLM's), or ``queries``/``documents``."""
    legacy = request.text_1 is not None or request.text_2 is not None
    modern = request.queries is not None or request.documents is not None
    if legacy and modern:
        raise bad_request("Give text_1 and text_2, or queries and documents, not both.", param="text_1")
    if modern:
        if request.queries is None or request.documents is None:
            raise bad_request("queries and documents are both required.", param="queries")
        return request.queries, request.documents, ("queries", "documents")
    if request.text_1 is None or request.text_2 is None:
        raise bad_request("text_1 and text_2 are both required (or queries and documents).", param="text_1")
    return request.text_1, request.text_2, ("text_1", "text_2")


async def _scores(
    service: ServingService, source: AdapterSource | None, request, left: list[str], right: list[str]
) -> tuple[list[float], list[Encoded]]:
    """The score of each pair ``(left[i], right[i])``: a cross-encoder's logit (``seq-cls``), or the cosine
    similarity of the two embeddings (``feature-extraction``); and what was tokenized (for ``usage``)."""
    truncate, direction = request.truncate, request.truncation_direction
    if service.task.classifies:
        _require_head(service, source, request.model)
        outputs = source.num_labels if source is not None and source.num_labels is not None else None
        outputs = outputs if outputs is not None else service.engine.base_num_labels
        if outputs != 1:
            raise bad_request(
                f"'{request.model}' has a {outputs}-class head; rerank and score need a one-output head (a "
                "cross-encoder, trained with one label).",
                param="model",
                code="not_a_cross_encoder",
            )
        encoded = service.encode(source, left, "documents", truncate, direction, pairs=right)
        logits = await service.run_encoded([(source, e) for e in encoded])
        values = torch.stack([x[0] for x in logits])
        if request.use_activation:
            values = values.sigmoid()
        return values.tolist(), encoded
    distinct = list(dict.fromkeys([*left, *right]))  # a query repeated for each document is embedded once
    encoded = service.encode(source, distinct, "documents", truncate, direction)
    vectors = dict(zip(distinct, await service.run_encoded([(source, e) for e in encoded])))
    cosine = [float(F.cosine_similarity(vectors[a], vectors[b], dim=0)) for a, b in zip(left, right)]
    return cosine, encoded


def _require_head(service: ServingService, source: AdapterSource | None, model: str) -> None:
    if source is None and not service.engine.base_has_head:
        raise bad_request(
            f"The base model '{model}' has no trained classification head (its folder has none); "
            "name an adapter in 'model' (GET /v1/models lists them).",
            param="model",
            code="no_classification_head",
        )


def _usage(encoded: list[Encoded]) -> Usage:
    tokens = sum(len(e.input_ids) for e in encoded)
    return Usage(prompt_tokens=tokens, total_tokens=tokens)


def _encode(vector, encoding_format: str) -> list[float] | str:
    """An embedding as floats, or as base64 of little-endian float32 (what OpenAI's client asks for)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
