"""Which engine runs a model, and opening it: the one place that knows both backends.

    backend = open_backend("small.gguf")            # llama.cpp for .gguf files (auto)
    backend = open_backend("runs/heal/final")       # transformers for anything kompakt loads
    backend = open_backend("all-minilm-l6-v2")      # an encoder: embeddings (backend.task == "embed")
    backend = open_backend("encoder-f16.gguf")      # a GGUF that declares a pooling: embeddings on llama.cpp
    backend = open_backend("runs/enc/export/onnx-int8")   # an ONNX encoder directory: embeddings on onnxruntime
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kompakt.errors import ConfigError, ModelFormatError, ModelNotFoundError
from kompakt.serve.backend import Backend

BACKENDS = ("auto", "transformers", "llamacpp", "onnxruntime")


def is_gguf_file(path: Path) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(source: str | Path | None, backend: str = "auto") -> str:
    """ "transformers", "llamacpp" or "onnxruntime" for `source`: a .gguf file runs on llama.cpp
    when llama-cpp-python is installed (else it is converted and runs on transformers); an ONNX
    export directory (model.onnx) runs on onnxruntime."""
    from kompakt.serve.backend_onnx_embed import is_onnx_dir

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    onnx = source is not None and is_onnx_dir(Path(str(source)).expanduser())
    if backend == "onnxruntime" or (backend == "auto" and onnx):
        if not onnx:
            raise ConfigError("the onnxruntime backend runs ONNX encoder directories; export one with "
                              "`kompakt export MODEL --format onnx`")  # fmt: skip
        return "onnxruntime"
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


def check_source(source: str | Path | None, backend: str) -> None:
    """Fail fast (before a port is bound or weights are read) on a source that is no model."""
    if backend == "onnxruntime":
        return  # choose_backend found model.onnx and config.json there
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
    """Load `source` on the chosen engine (see choose_backend); engines are imported here,
    so asking which engine to use costs neither torch nor llama.cpp."""
    kind = choose_backend(source, backend)
    if kind == "onnxruntime":
        from kompakt.serve.backend_onnx_embed import OnnxEmbeddingBackend

        return OnnxEmbeddingBackend(Path(str(source)).expanduser())
    if kind == "llamacpp":
        from kompakt.serve.backend_llamacpp import LlamaCppBackend
        from kompakt.serve.backend_llamacpp_embed import NO_POOLING, LlamaCppEmbeddingBackend, gguf_pooling

        path = Path(str(source)).expanduser()
        if gguf_pooling(path) not in (None, NO_POOLING):  # a sentence encoder: /v1/embeddings
            return LlamaCppEmbeddingBackend(path, n_ctx=n_ctx)
        return LlamaCppBackend(path, n_ctx=n_ctx)
    from kompakt.model.load import load

    loaded = load(source)
    if loaded.is_encoder:  # a sentence-embedding model: /v1/embeddings, no generation
        from kompakt.serve.backend_embeddings import EmbeddingBackend

        return EmbeddingBackend(loaded)
    from kompakt.serve.backend_transformers import TransformersBackend

    return TransformersBackend(loaded)
