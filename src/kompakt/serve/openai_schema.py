"""OpenAI API request validation and response shapes (chat completions, completions, errors).

Requests are validated by hand-called pydantic models (not FastAPI body parameters), so every
malformed body becomes a 400 with the OpenAI error shape instead of FastAPI's 422 detail list.
Unknown fields are ignored (clients send many); fields that would change the answer in a way
this server cannot honour (n > 1, tools) are rejected rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

MAX_STOP_SEQUENCES = 16
MAX_BATCH_PROMPTS = 64  # /v1/completions prompt lists (lm-evaluation-harness batches)
MAX_BODY_BYTES = 8 * 1024 * 1024  # enforced while the body is read (kompakt.serve.body_limit)


class APIError(Exception):
    """An error answered with the OpenAI error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _Sampling(_Request):
    model: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1  # one choice per request, said plainly
    # Accepted for client compatibility; this server does not apply penalties.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: StrictStr | None = None
    logit_bias: dict[int, float] | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _check_stop(cls, value: Any) -> str | list[str] | None:
        # By hand: a union's errors would name the first branch ("Input should be a valid string").
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"a string or a list of at most {MAX_STOP_SEQUENCES} strings")
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences (got {len(value)})")
        return value

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> dict[int, float] | None:
        """OpenAI's map of token id (a JSON string key) to a bias in [-100, 100]; the ids'
        range depends on the model and is checked against its vocabulary when served."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("an object mapping token ids to biases in [-100, 100]")
        bias: dict[int, float] = {}
        for key, amount in value.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"key {key!r} is not a token id (an integer)") from None
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
                raise ValueError(f"the bias of token {token} must be a number in [-100, 100] (got {amount!r})")
            bias[token] = float(amount)
        return bias

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    tools: list[Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are served on /v1/completions (echo + logprobs), not on chat")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tool calls are not supported by this server")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.text()} for message in self.messages]


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


def _check_prompt(value: Any) -> str | list[int] | list[str] | list[list[int]]:
    """A string, a list of token ids, or a batch (1..MAX_BATCH_PROMPTS) of either. By hand,
    so an error names what is wrong rather than the first branch of a union; token ids'
    range depends on the model and is checked against its vocabulary when served."""
    if isinstance(value, str) or _token_ids(value):
        return value
    expected = "a string, a list of token ids, or a list of strings or of token-id lists"
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected {expected}" + (" (got an empty list)" if value == [] else ""))
    if len(value) > MAX_BATCH_PROMPTS:
        raise ValueError(f"at most {MAX_BATCH_PROMPTS} prompts per request (got {len(value)})")
    if all(isinstance(item, str) for item in value) or all(_token_ids(item) for item in value):
        return value
    raise ValueError(f"expected {expected}; every item of a batch must be of the same kind and not empty")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] = 16  # the OpenAI default for completions
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=1)] | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _valid_prompt(cls, value: Any) -> str | list[int] | list[str] | list[list[int]]:
        return _check_prompt(value)

    def prompts(self) -> list[str | list[int]]:
        """The batch: one string or token-id list per choice."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; any problem becomes a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(
            str(part) for part in first.get("loc", ()) if not str(part).startswith(("function-", "str", "list["))
        )
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise APIError(400, f"{param or 'body'}: {message}", param=param or None) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


def chat_chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None,
               with_usage: bool) -> dict:  # fmt: skip
    chunk = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
    return chunk


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(id: str, model: str, choices: list[dict], usage_: dict | None,
                        object: str = "text_completion", created: int | None = None) -> dict:  # fmt: skip
    body = {
        "id": id,
        "object": object,
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(id: str, model: str, created: int, object: str, usage_: dict) -> dict:
    return {"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage_}


def models_list(model_id: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kompakt"}],
    }
