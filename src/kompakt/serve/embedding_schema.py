"""/v1/embeddings request validation and response shape (OpenAI's embeddings API).

    {"input": "a sentence" | ["a", "b"] | [101, 2023, 102] | [[101, 102], ...],
     "model": "...", "encoding_format": "float" | "base64", "dimensions": 128}

Limits follow OpenAI's documented ones, so an indexing tool configured for OpenAI (LangChain
sends 1000 inputs per request by default) works unchanged: at most MAX_EMBEDDING_INPUTS inputs
per request, and the tokens of one request summed over its inputs are capped by
ServerSettings.max_embedding_tokens (checked after tokenizing, before the model runs).

`truncate` is not OpenAI's (the name is Hugging Face TEI's): a text longer than the model's
limit is cut to it by default, as sentence-transformers (and kompakt's embed()) do, so the
server returns what the model was evaluated with; `truncate: false` refuses such a text with
400 context_length_exceeded instead. Token-id inputs are never cut: they are refused when too
long, because only the client knows which of its ids may go.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from kompakt.serve.openai_schema import _Request

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's per-request limit on the number of inputs
MAX_EMBEDDING_TOKENS = 300_000  # OpenAI's per-request limit on tokens summed over the inputs

Inputs = str | list[str] | list[int] | list[list[int]]


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


def _check_input(value: Any) -> Inputs:
    """A string, a list of token ids, or a batch (1..MAX_EMBEDDING_INPUTS) of either; by hand so
    the error names what is wrong (a union's errors name its first branch)."""
    if isinstance(value, str) or _token_ids(value):
        return value
    expected = "a string, a list of token ids, or a list of strings or of token-id lists"
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected {expected}" + (" (got an empty list)" if value == [] else ""))
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request (got {len(value)}); split the batch")
    if all(isinstance(item, str) for item in value) or all(_token_ids(item) for item in value):
        return value
    raise ValueError(f"expected {expected}; every item of a batch must be of the same kind and not empty")


class EmbeddingRequest(_Request):
    input: Inputs
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    truncate: StrictBool = True  # kompakt (TEI) extension, see the module docstring

    @field_validator("input", mode="plain")
    @classmethod
    def _valid_input(cls, value: Any) -> Inputs:
        return _check_input(value)

    def inputs(self) -> list[str | list[int]]:
        """The batch: one string or token-id list per embedding, in request order."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)


def shorten(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """The first `dimensions` values of each row [n, d] -> [n, dimensions], back to unit length
    when the model's embeddings are unit length (OpenAI's `dimensions`; only models trained with
    a Matryoshka loss keep their quality when shortened)."""
    head = np.ascontiguousarray(vectors[:, :dimensions], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(head, axis=1, keepdims=True)
        head = head / np.maximum(norms, 1e-12)
    return head


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32 bytes, as OpenAI (and its client) use
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def embedding_response(model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encoded(vector, encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
