"""Measured speed of a model shape in llama.cpp, cached by shape.

Why measured: parameter counts do not tell speed (a layer costs a kernel launch and a KV-cache
read whatever its width; the tied embedding is a large matmul per generated token), so each
candidate shape's prompt and generation tokens/s are measured with llama.cpp on this machine:
the candidate is written as an f16 GGUF and run by kompakt.report.probe in a fresh process (best
of 3, with the machine's load average beside it: other processes only ever slow a shape
down, so compare speeds measured at similar loads). Speed depends on the shape, not on the weights, so results are cached in
`~/.cache/kompakt/search/latency.json` keyed by the shape, the GGUF type, the threads and the
llama.cpp version: a shape is measured once per machine.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from kompakt.atomic import write_text
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("model_type", "vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")  # fmt: skip
GGUF_TYPE = "f16"


def _llama_version() -> str:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except ImportError:
        return "none"


def default_threads() -> int:
    return min(4, os.cpu_count() or 1)


def shape_key(loaded: LoadedModel, threads: int, type: str = GGUF_TYPE) -> str:
    """The cache key of `loaded`'s shape on this machine's llama.cpp."""
    config = loaded.model.config.get_text_config()
    shape = {key: getattr(config, key, None) for key in SHAPE_KEYS}
    return json.dumps({**shape, "type": type, "threads": threads, "llama_cpp": _llama_version()}, sort_keys=True)


def _cache_file() -> Path:
    from kompakt.model.cache import cache_subdir

    return cache_subdir("search") / "latency.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or a damaged file: measured again


def measure_latency(loaded: LoadedModel, threads: int | None = None, *, use_cache: bool = True) -> dict:
    """{prefill_tps, generate_tps, threads, backend, cached} for `loaded`'s shape, or {error}
    when llama.cpp cannot run it (recorded, the search goes on without its speed)."""
    from kompakt.errors import KompaktError
    from kompakt.export.gguf import export_gguf
    from kompakt.report.probe import probe

    threads = threads or default_threads()
    key = shape_key(loaded, threads)
    path = _cache_file()
    cache = _read_cache(path) if use_cache else {}
    if key in cache:
        return {**cache[key], "cached": True}
    with tempfile.TemporaryDirectory(prefix="kompakt-latency-") as scratch:
        try:
            gguf = export_gguf(loaded, Path(scratch) / "shape.gguf", type=GGUF_TYPE)
        except KompaktError as error:
            return {"error": f"no GGUF for this shape: {error}"}
        measured = probe(gguf, "llamacpp", threads=threads)
    if "error" in measured:
        logger.warning("search: speed not measured: %s", measured["error"])
        return measured
    entry = {name: measured.get(name) for name in ("prefill_tps", "generate_tps", "backend", "threads",
                                                    "prompt_tokens", "gen_tokens")}  # fmt: skip
    entry["type"] = GGUF_TYPE
    entry["load_average"] = round(os.getloadavg()[0], 2)  # a busy machine only slows a shape down: judge by it
    cache = _read_cache(path)  # re-read: another run may have added shapes meanwhile
    cache[key] = entry
    write_text(path, json.dumps(cache, indent=1) + "\n")
    return {**entry, "cached": False}
