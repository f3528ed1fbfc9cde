"""The encoder endpoints: ``POST /v1/embeddings`` and ``POST /v1/classify``.

Each function checks a request, finds its adapter in the catalog (404/400 before anything is queued),
tokenizes its texts, queues one work item per text on the service's batcher, and builds the response.
"""

from __future__ import annotations

import base64
import time
import uuid

from lntune.serve.catalog import label_names
from lntune.serve.errors import bad_request
from lntune.serve.schemas import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    Usage,
)
from lntune.serve.service import ServingService


async def embeddings(service: ServingService, request: EmbeddingRequest) -> EmbeddingResponse:
    """``POST /v1/embeddings``: one pooled embedding per input."""
    service.require_endpoint("/v1/embeddings")
    if request.dimensions is not None:
        raise bad_request("dimensions is not supported: embeddings have the model's size.", param="dimensions")
    source = service.catalog.resolve(request.model)
    ids = service.tokenize(service.texts(request.input, "input"), "input")
    vectors = await service.run(source, ids)
    data = [EmbeddingData(index=i, embedding=_encode(v, request.encoding_format)) for i, v in enumerate(vectors)]
    tokens = sum(len(x) for x in ids)
    return EmbeddingResponse(data=data, model=request.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


async def classify(service: ServingService, request: ClassifyRequest) -> ClassifyResponse:
    """``POST /v1/classify``: class probabilities and the most likely label per input."""
    service.require_endpoint("/v1/classify")
    source = service.catalog.resolve(request.model)
    if source is None and not service.engine.base_has_head:
        raise bad_request(
            f"The base model '{request.model}' has no trained classification head (its folder has none); "
            "name an adapter in 'model' (GET /v1/models lists them).",
            param="model",
            code="no_classification_head",
        )
    ids = service.tokenize(service.texts(request.input, "input"), "input")
    all_probs = await service.run(source, ids)
    data = []
    for i, probs in enumerate(all_probs):
        labels = label_names(len(probs), service.engine.base_labels, source and source.labels)
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


def _encode(vector, encoding_format: str) -> list[float] | str:
    """An embedding as floats, or as base64 of little-endian float32 (what OpenAI's client asks for)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
