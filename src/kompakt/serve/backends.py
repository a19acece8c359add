"""Inference backends behind the server and the chat: one interface, two engines.

    backend = open_backend("small.gguf")            # llama.cpp for .gguf files (auto)
    backend = open_backend("runs/heal/final")       # transformers for anything kompakt loads
    ids = backend.encode_chat([{"role": "user", "content": "hi"}])
    for chunk in backend.stream(ids, Sampling(max_tokens=64)): ...

A backend works on token ids: the server counts them (context check, usage) before the
model runs, and lm-evaluation-harness sends prompts already tokenized. Every method is
called from one thread at a time (kompakt.serve.limits.ModelWorker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from kompakt.errors import ConfigError, ModelFormatError, ModelNotFoundError
from kompakt.model.loaded import LoadedModel
from kompakt.serve.generate import (
    Chunk,
    _IncrementalDecoder,  # package-private helpers shared with stream_chunks
    _StopStrings,
    check_sampling,
    encode_input,
    stream_token_ids,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "llamacpp")
Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Sampling:
    """Generation parameters as the OpenAI API names them (temperature 0 = greedy)."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of a sequence, as /v1/completions `logprobs` reports them.

    Attributes:
        tokens: each token as text.
        logprobs: log p(token | everything before it); None for the first token.
        top: the `top_n` most likely tokens at each position (None for the first).
    """

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


class Backend(Protocol):
    kind: str  # "transformers" | "llamacpp"
    model_id: str  # the name /v1/models reports
    context_length: int
    vocab_size: int

    def encode_text(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: Messages) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Chunk]: ...
    def score(self, ids: list[int], top_n: int) -> TokenScores: ...
    def close(self) -> None: ...


class TransformersBackend:
    """Any model kompakt loads (kompakt.model.load.load), on its own token loop."""

    kind = "transformers"

    def __init__(self, loaded: LoadedModel, model_id: str | None = None) -> None:
        self.loaded = loaded
        self.model_id = model_id or loaded.name
        self.context_length = loaded.context_length
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])

    def encode_text(self, text: str) -> list[int]:
        return encode_input(self.loaded, text)

    def encode_chat(self, messages: Messages) -> list[int]:
        from jinja2 import TemplateError

        try:
            return encode_input(self.loaded, messages)
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. "roles must alternate"
            raise ConfigError(f"the chat template rejected the messages: {exc}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Chunk]:
        """Like generate.stream_chunks, from token ids (prompts may arrive tokenized)."""
        check_sampling(sampling.max_tokens, sampling.temperature, sampling.top_p)
        decoder, stopper = _IncrementalDecoder(self.loaded.tokenizer), _StopStrings(sampling.stop)
        limit = min(sampling.max_tokens, self.context_length - len(ids))
        produced = 0
        tokens = stream_token_ids(
            self.loaded, ids, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed,
        )  # fmt: skip
        try:
            for token in tokens:
                produced += 1
                text, hit = stopper.feed(decoder.add(token))
                if hit:
                    yield Chunk(text, token, "stop")
                    return
                yield Chunk(text, token)
        finally:
            tokens.close()
        text, hit = stopper.feed(decoder.flush())
        tail = text if hit else text + stopper.flush()
        yield Chunk(tail, None, "length" if produced >= limit and not hit else "stop")

    def score(self, ids: list[int], top_n: int) -> TokenScores:
        """One forward pass: log p(ids[i] | ids[:i]) and the top_n alternatives at each i."""
        model = self.loaded.model
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=self.loaded.device)).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # [n, vocab]; row i predicts i+1
        pieces = [self.loaded.tokenizer.decode([token]) for token in ids]
        chosen: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            chosen.append(float(row[ids[position]]))
            top.append(self._top(row, max(top_n, 1)))
        return TokenScores(pieces, chosen, top)

    def _top(self, row: torch.Tensor, n: int) -> dict[str, float]:
        values, indices = torch.topk(row, n)
        return {self.loaded.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices)}

    def close(self) -> None:
        pass


def is_gguf_file(path: Path) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def choose_backend(source: str | Path | None, backend: str = "auto") -> str:
    """ "transformers" or "llamacpp" for `source`: a .gguf file runs on llama.cpp when
    llama-cpp-python is installed (else it is converted and runs on transformers)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    gguf = source is not None and Path(str(source)).expanduser().suffix.lower() == ".gguf"
    if backend == "llamacpp":
        if not gguf:
            raise ConfigError(
                "the llamacpp backend runs .gguf files; export one with `kompakt export MODEL --format gguf`"
            )
        return "llamacpp"
    if backend == "auto" and gguf and llama_cpp_available():
        return "llamacpp"
    return "transformers"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_source(source: str | Path | None, backend: str) -> None:
    """Fail fast (before a port is bound or weights are read) on a source that is no model."""
    if backend == "llamacpp":
        path = Path(str(source)).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"no file at {path}; pass a .gguf file")
        if not is_gguf_file(path):
            raise ModelFormatError(f"{path} is not a GGUF file (wrong magic bytes); pass a .gguf file")
        return
    from kompakt.model.hf_dir import check_model_dir
    from kompakt.model.load import resolve_model_dir

    check_model_dir(resolve_model_dir(source))  # headers only: no weights are read yet


def open_backend(source: str | Path | None = None, backend: str = "auto", *, n_ctx: int | None = None) -> Backend:
    """Load `source` on the chosen engine (see choose_backend)."""
    kind = choose_backend(source, backend)
    if kind == "llamacpp":
        from kompakt.serve.backend_llamacpp import LlamaCppBackend

        return LlamaCppBackend(Path(str(source)).expanduser(), n_ctx=n_ctx)
    from kompakt.model.load import load

    return TransformersBackend(load(source))
