"""/v1/embeddings: validate, tokenize, queue, embed in batches, shape the answer.

Everything that can be refused (bad body 400, unknown model 404, a generation model 400
model_not_supported, `dimensions` above the model's width 400, token ids outside the
vocabulary or over the limit 400, a request over the token budget 400, queue full 503) is
decided before the model runs. Inputs are embedded in batches of EMBED_BATCH, shortest first
(less padding), each batch one call on the model thread, and the client is polled between
batches: a client that leaves stops the work at the next batch.

A generation model (a causal LM) asked for embeddings is refused with 400 model_not_supported
naming an embedding model to serve, not answered with mean-pooled hidden states: a causal LM
not trained for embeddings gives vectors whose cosines barely separate related from unrelated
sentences, and a retrieval index built on them fails quietly. vLLM (a model served for
generation) and llama-server (without --embeddings) refuse the same way.
"""

from __future__ import annotations

import logging

import numpy as np

from kompakt.errors import KompaktError
from kompakt.serve.backend import InputTooLong
from kompakt.serve.embedding_schema import EmbeddingRequest, embedding_response, shorten
from kompakt.serve.openai_schema import APIError, parse_request
from kompakt.serve.state import ServerState

log = logging.getLogger(__name__)

EMBED_BATCH = 32  # inputs per forward pass: sentence-transformers' default batch size


def _check_dimensions(backend, dimensions: int | None) -> None:
    if dimensions is not None and dimensions > backend.dimensions:
        raise APIError(
            400,
            f"dimensions: this model's embeddings have {backend.dimensions} values; ask for at most {backend.dimensions}",
            param="dimensions",
        )


async def _token_rows(state: ServerState, backend, request: EmbeddingRequest) -> list[list[int]]:
    """Token ids of every input: texts tokenized (and cut) by the model, ids checked as sent."""
    inputs = request.inputs()
    try:
        if isinstance(inputs[0], str):
            return await state.worker.call(backend.tokenize, inputs, request.truncate)
        for index, ids in enumerate(inputs):
            backend.check_ids(ids, "input" if len(inputs) == 1 else f"input[{index}]")
        return [list(ids) for ids in inputs]
    except KompaktError as error:
        code = "context_length_exceeded" if isinstance(error, InputTooLong) else None
        raise APIError(400, str(error), param="input", code=code) from None


def _check_budget(state: ServerState, rows: list[list[int]]) -> int:
    """The request's tokens (after cutting) within settings.max_embedding_tokens; returns them."""
    total, cap = sum(len(ids) for ids in rows), state.settings.max_embedding_tokens
    if total > cap:
        raise APIError(
            400,
            f"the inputs hold {total} tokens in all; one request may hold at most {cap}; "
            "send fewer inputs per request",
            param="input",
            code="too_many_tokens",
        )
    return total


async def _embed_all(state: ServerState, http_request, backend, rows: list[list[int]]) -> np.ndarray | None:
    """Embeddings [n, d] in request order; None when the client left before the end."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    vectors = np.empty((len(rows), backend.dimensions), dtype=np.float32)
    for start in range(0, len(order), EMBED_BATCH):
        chosen = order[start : start + EMBED_BATCH]
        vectors[chosen] = await state.worker.call(backend.embed_ids, [rows[i] for i in chosen])
        if start + EMBED_BATCH < len(order) and await http_request.is_disconnected():
            log.info("client disconnected; embedding stopped")
            return None
    return vectors


async def embeddings(state: ServerState, http_request, body: object):
    """The /v1/embeddings route (app.py)."""
    request: EmbeddingRequest = parse_request(EmbeddingRequest, body)
    backend = state.served_backend(request.model, task="embed")
    _check_dimensions(backend, request.dimensions)
    rows = await _token_rows(state, backend, request)
    total = _check_budget(state, rows)
    ticket = state.admit()
    try:
        async with state.worker.turn(ticket):
            vectors = await _embed_all(state, http_request, backend, rows)
    except KompaktError as error:
        raise APIError(400, str(error)) from None
    if vectors is None:
        raise APIError(499, "client closed the request")
    if request.dimensions is not None:
        vectors = shorten(vectors, request.dimensions, backend.normalize)
    return embedding_response(backend.model_id, vectors, request.encoding_format, total)
