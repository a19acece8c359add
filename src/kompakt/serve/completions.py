"""/v1/chat/completions and /v1/completions: validate, queue, generate, shape the answer.

Order matters for status codes: everything that can be refused (bad body 400, unknown model
404, token id outside the vocabulary 400, prompt over the context or a batch over the
prompt-token cap 400, queue full 503) is decided before a streaming response starts; after
the first byte, errors can only travel inside the stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from kompakt.errors import KompaktError
from kompakt.serve.backend import Backend, Chunk, Sampling, check_token_ids
from kompakt.serve.limits import Ticket
from kompakt.serve.openai_schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_choice,
    completion_response,
    error_body,
    new_id,
    parse_request,
    usage,
    usage_chunk,
)
from kompakt.serve.state import ServerState

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # non-streaming requests: how often to ask whether the client left


def _sampling(state: ServerState, request, requested: int | None, prompt_len: int) -> Sampling:
    room = state.ready_backend().context_length - prompt_len
    cap = state.settings.max_tokens_cap
    return Sampling(
        max_tokens=max(0, min(requested if requested is not None else cap, cap, room)),
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_list(),
        logit_bias=request.logit_bias or {},
    )


def _check_ids(backend: Backend, ids: Sequence[int], field_name: str) -> None:
    """A 400 naming `field_name` and the valid range for a token id outside the vocabulary."""
    try:
        check_token_ids(ids, backend.vocab_size, field_name)
    except KompaktError as error:
        raise APIError(400, str(error), param=field_name) from None


def _check_context(backend: Backend, ids: list[int], generates: bool) -> None:
    limit = backend.context_length - (1 if generates else 0)
    if len(ids) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {backend.context_length} tokens; the prompt has "
            f"{len(ids)} tokens. Shorten the prompt.",
            param="messages",
            code="context_length_exceeded",
        )


async def _encode(state: ServerState, encode: Callable, value) -> list[int]:
    try:
        return await state.worker.call(encode, value)
    except KompaktError as error:
        raise APIError(400, str(error)) from None


async def _chunks(state: ServerState, http_request, ids: list[int], sampling: Sampling,
                  poll_disconnect: bool) -> AsyncIterator[Chunk]:  # fmt: skip
    """Chunks of one generation, each step run on the model thread.

    Streaming: starlette cancels this generator when the client disconnects (ASGI 2.3).
    Non-streaming: the client is polled every DISCONNECT_POLL_S. Either way the backend's
    generator is closed on the model thread, which ends the token loop.
    """
    worker, backend = state.worker, state.ready_backend()
    generator = backend.stream(ids, sampling)  # nothing runs until the first next()
    last_poll = time.monotonic()
    try:
        while True:
            chunk = await worker.call(next, generator, None)
            if chunk is None:
                return
            yield chunk
            if chunk.finish_reason:
                return
            if poll_disconnect and time.monotonic() - last_poll > DISCONNECT_POLL_S:
                last_poll = time.monotonic()
                if await http_request.is_disconnected():
                    log.info("client disconnected; generation stopped")
                    return
    finally:
        worker.submit(generator.close)


async def _collect(state, http_request, ids, sampling) -> tuple[str, list[int], str]:
    pieces, tokens, finish = [], [], "stop"
    async for chunk in _chunks(state, http_request, ids, sampling, poll_disconnect=True):
        pieces.append(chunk.text)
        if chunk.token_id is not None:
            tokens.append(chunk.token_id)
        finish = chunk.finish_reason or finish
    return "".join(pieces), tokens, finish


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _streaming_response(ticket: Ticket, events: AsyncIterator[bytes]):
    from starlette.responses import StreamingResponse

    class _TicketedStream(StreamingResponse):
        # The ticket is released even if the body iterator never starts (client gone early).
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                ticket.release()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _TicketedStream(events, media_type="text/event-stream", headers=headers)


async def _guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """After the first byte an error can only be reported inside the stream."""
    try:
        async for event in events:
            yield event
    except KompaktError as error:
        yield _sse(error_body(str(error)))
        yield _sse("[DONE]")


async def chat(state: ServerState, http_request, body: object):
    request: ChatRequest = parse_request(ChatRequest, body)
    backend = state.served_backend(request.model)
    _check_ids(backend, list(request.logit_bias or {}), "logit_bias")
    ids = await _encode(state, backend.encode_chat, request.plain_messages())
    _check_context(backend, ids, generates=True)
    sampling = _sampling(state, request, request.requested_max_tokens(), len(ids))
    ticket = state.admit()
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = _chat_events(state, http_request, ticket, ids, sampling, backend.model_id, include_usage)
        return _streaming_response(ticket, _guarded(events))
    try:
        async with state.worker.turn(ticket):
            text, tokens, finish = await _collect(state, http_request, ids, sampling)
    except KompaktError as error:
        raise APIError(400, str(error)) from None
    return chat_response(new_id("chatcmpl"), backend.model_id, text, finish, usage(len(ids), len(tokens)))


async def _chat_events(state, http_request, ticket, ids, sampling, model_id, include_usage) -> AsyncIterator[bytes]:
    stream_id, created, produced = new_id("chatcmpl"), int(time.time()), 0
    async with state.worker.turn(ticket):
        yield _sse(chat_chunk(stream_id, model_id, created, {"role": "assistant", "content": ""}, None, include_usage))
        async for chunk in _chunks(state, http_request, ids, sampling, poll_disconnect=False):
            produced += chunk.token_id is not None
            if chunk.text:
                delta = {"content": chunk.text}
                yield _sse(chat_chunk(stream_id, model_id, created, delta, None, include_usage))
            if chunk.finish_reason:
                yield _sse(chat_chunk(stream_id, model_id, created, {}, chunk.finish_reason, include_usage))
    if include_usage:
        yield _sse(usage_chunk(stream_id, model_id, created, "chat.completion.chunk", usage(len(ids), produced)))
    yield _sse("[DONE]")


async def complete(state: ServerState, http_request, body: object):
    request: CompletionRequest = parse_request(CompletionRequest, body)
    backend = state.served_backend(request.model)
    _check_ids(backend, list(request.logit_bias or {}), "logit_bias")
    prompts = request.prompts()
    if request.stream and (len(prompts) > 1 or request.logprobs is not None):
        raise APIError(400, "streaming serves one prompt without logprobs; send stream=false for batches or logprobs")
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            _check_ids(backend, prompt, "prompt" if len(prompts) == 1 else f"prompt[{index}]")
        ids = list(prompt) if isinstance(prompt, list) else await _encode(state, backend.encode_text, prompt)
        _check_context(backend, ids, generates=request.max_tokens > 0)
        encoded.append((prompt, ids))
    _check_prompt_budget(state, [ids for _, ids in encoded])
    ticket = state.admit()
    if request.stream:
        prompt, ids = encoded[0]
        sampling = _sampling(state, request, request.max_tokens, len(ids))
        events = _completion_events(state, http_request, ticket, prompt, ids, sampling, request, backend.model_id)
        return _streaming_response(ticket, _guarded(events))
    choices, prompt_total, completion_total = [], 0, 0
    try:
        async with state.worker.turn(ticket):
            for index, (prompt, ids) in enumerate(encoded):
                choice, produced = await _one_completion(state, http_request, index, prompt, ids, request)
                choices.append(choice)
                prompt_total, completion_total = prompt_total + len(ids), completion_total + produced
    except KompaktError as error:
        raise APIError(400, str(error)) from None
    return completion_response(new_id("cmpl"), backend.model_id, choices, usage(prompt_total, completion_total))


def _check_prompt_budget(state: ServerState, encoded: list[list[int]]) -> None:
    """One request may carry at most settings.max_prompt_tokens prompt tokens over its batch:
    each is run (and scored, with logprobs) on the single model worker while others wait."""
    total, cap = sum(len(ids) for ids in encoded), state.settings.max_prompt_tokens
    if total > cap:
        raise APIError(
            400,
            f"the prompts hold {total} tokens in all; one request may hold at most {cap} prompt tokens "
            "(prompt tokens x batch); send fewer or shorter prompts per request",
            param="prompt",
            code="too_many_prompt_tokens",
        )


async def _one_completion(state, http_request, index: int, prompt, ids: list[int], request: CompletionRequest):
    backend = state.ready_backend()
    sampling = _sampling(state, request, request.max_tokens, len(ids))
    text, tokens, finish = "", [], "length"
    if sampling.max_tokens > 0:
        text, tokens, finish = await _collect(state, http_request, ids, sampling)
    prompt_text = prompt if isinstance(prompt, str) else await state.worker.call(backend.decode, ids)
    logprobs = None
    if request.logprobs is not None:
        scores = await state.worker.call(backend.score, ids + tokens, request.logprobs)
        start = 0 if request.echo else len(ids)
        offset = 0 if request.echo else len(prompt_text)
        logprobs = _logprobs_block(scores, start, offset)
    full = prompt_text + text if request.echo else text
    return completion_choice(index, full, finish, logprobs), len(tokens)


def _logprobs_block(scores, start: int, offset: int) -> dict:
    """The legacy completions logprobs object for tokens[start:], offsets counted from `offset`."""
    offsets = []
    for piece in scores.tokens[start:]:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": scores.tokens[start:],
        "token_logprobs": scores.logprobs[start:],
        "top_logprobs": scores.top[start:],
        "text_offset": offsets,
    }


async def _completion_events(
    state, http_request, ticket, prompt, ids, sampling, request, model_id
) -> AsyncIterator[bytes]:
    stream_id, created, produced = new_id("cmpl"), int(time.time()), 0
    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def event(text: str, finish: str | None) -> bytes:
        body = completion_response(stream_id, model_id, [completion_choice(0, text, finish)], None, created=created)
        if include_usage:
            body["usage"] = None
        return _sse(body)

    async with state.worker.turn(ticket):
        if request.echo:
            prompt_text = (
                prompt if isinstance(prompt, str) else await state.worker.call(state.ready_backend().decode, ids)
            )
            yield event(prompt_text, None)
        if sampling.max_tokens == 0:
            yield event("", "length")
        else:
            async for chunk in _chunks(state, http_request, ids, sampling, poll_disconnect=False):
                produced += chunk.token_id is not None
                if chunk.text or chunk.finish_reason:
                    yield event(chunk.text, chunk.finish_reason)
    if include_usage:
        yield _sse(usage_chunk(stream_id, model_id, created, "text_completion", usage(len(ids), produced)))
    yield _sse("[DONE]")
