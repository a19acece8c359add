"""The llama.cpp embedding backend: a sentence-encoder .gguf (e.g. `kompakt export ENC --format gguf`)
served on /v1/embeddings by llama-cpp-python, as llama-server --embeddings serves it.

A GGUF is an embedding model when its header declares a pooling (`<arch>.pooling_type`, mean /
CLS / last; llama.cpp pools with it). The pooled vector is L2-normalised, as llama-server's
/v1/embeddings does by default (the GGUF does not record sentence-transformers' Normalize
module; cosines are the same either way). Texts are tokenized by llama.cpp with the model's
special tokens; a text over the limit keeps its first tokens and, when the vocabulary appends
an end token ([SEP], </s>), that last token, as Hugging Face tokenizers truncate. Token-id
inputs are embedded as given. llama-cpp-python's `embed` takes only strings, so a row of ids is
decoded here through the same calls it makes (one sequence per decode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError, ModelFormatError
from kompakt.serve.backend import InputTooLong, check_token_ids
from kompakt.serve.backend_llamacpp import _gguf_field

NO_POOLING = 0  # llama.cpp's LLAMA_POOLING_TYPE_NONE: token states, no sentence vector
DEFAULT_N_CTX = 512


def gguf_pooling(path: Path) -> int | None:
    """The pooling type a GGUF header declares (None: a generation model's file, no pooling key)."""
    arch = _gguf_field(path, "general.architecture")
    value = _gguf_field(path, f"{arch}.pooling_type") if arch else None
    return None if value is None else int(value)


class LlamaCppEmbeddingBackend:
    """A sentence-encoder GGUF on llama.cpp (task "embed"). Args: the .gguf path; n_ctx (default:
    the model's context length, at most DEFAULT_N_CTX)."""

    kind = "llamacpp"
    task = "embed"
    has_chat_template = False
    normalize = True

    def __init__(self, path: Path, *, n_ctx: int | None = None, n_threads: int | None = None) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError("serving a .gguf needs llama-cpp-python: pip install 'kompakt[llamacpp]'") from None
        if gguf_pooling(path) in (None, NO_POOLING):
            raise ModelFormatError(f"{path} declares no pooling; it is not a sentence-embedding GGUF")
        arch = _gguf_field(path, "general.architecture")
        trained = int(_gguf_field(path, f"{arch}.context_length") or DEFAULT_N_CTX)
        self.context_length = int(n_ctx or min(trained, DEFAULT_N_CTX))
        try:  # an encoder sees a whole sequence in one micro-batch
            self.llm = llama_cpp.Llama(
                model_path=str(path), embedding=True, n_ctx=self.context_length, n_batch=self.context_length,
                n_ubatch=self.context_length, verbose=False, n_threads=n_threads or max(1, os.cpu_count() or 2),
            )  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"llama.cpp cannot load {path} ({exc}); check the file") from None
        self._llama_cpp = llama_cpp
        self.model_id = path.stem
        self.vocab_size = int(self.llm.n_vocab())
        self.dimensions = int(self.llm.n_embd())
        self._ends_with_special = bool(llama_cpp.llama_vocab_get_add_eos(self.llm._model.vocab))

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        limit, rows = self.context_length, []
        for index, text in enumerate(texts):
            ids = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            if len(ids) > limit:
                if not truncate:
                    raise InputTooLong(
                        f"input[{index}] has {len(ids)} tokens; this model embeds at most {limit}. "
                        "Shorten it, or send truncate: true to embed its first tokens"
                    )
                ids = ids[: limit - 1] + ids[-1:] if self._ends_with_special else ids[:limit]
            rows.append(list(ids))
        return rows

    def check_ids(self, ids: Sequence[int], field_name: str) -> None:
        check_token_ids(ids, self.vocab_size, field_name)
        if len(ids) > self.context_length:
            raise InputTooLong(f"{field_name} has {len(ids)} tokens; this model embeds at most {self.context_length}")

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, L2-normalised embeddings [len(batch), dimensions], one llama.cpp decode per row."""
        llama_cpp, llm = self._llama_cpp, self.llm
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        for row, ids in enumerate(batch):
            llm._batch.reset()
            llm._batch.add_sequence(list(ids), 0, True)
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(llm._batch)
            out[row] = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0), (self.dimensions,))
        llm._batch.reset()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def close(self) -> None:
        self.llm.close()
