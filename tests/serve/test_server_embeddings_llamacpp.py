"""A sentence-encoder GGUF served on llama.cpp answers /v1/embeddings like the HF model it came from."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from kompakt.errors import KompaktError  # noqa: E402
from kompakt.model.encode import embed  # noqa: E402
from kompakt.model.tiny import tiny_encoder  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import running_server  # noqa: E402

SENTENCES = ["A cat sat on the mat.", "Stock prices fell sharply on Monday.", "hi", "word " * 300]


@pytest.fixture(scope="module")
def encoder_gguf(tmp_path_factory):
    """(the tiny BERT, its f32 GGUF written by kompakt's exporter)."""
    from kompakt.export.api import export

    loaded = tiny_encoder("bert")
    out = tmp_path_factory.mktemp("gguf") / "tiny-bert.gguf"
    try:
        export(loaded, format="gguf", type="f32", out=out)
    except KompaktError as error:  # a checkout without the encoder GGUF exporter (kompakt.export)
        pytest.skip(f"this checkout cannot export encoders to GGUF: {error}")
    return loaded, out


def test_open_backend_picks_llamacpp_embeddings_for_an_encoder_gguf(encoder_gguf):
    from kompakt.serve.backend_choice import open_backend

    loaded, path = encoder_gguf
    backend = open_backend(path)
    try:
        assert (backend.kind, backend.task, backend.dimensions) == ("llamacpp", "embed", 64)
        rows = backend.tokenize(SENTENCES)  # llama.cpp's tokenizer and cut: as the HF tokenizer's
        assert rows == loaded.tokenizer(SENTENCES, truncation=True, max_length=128)["input_ids"]
        np.testing.assert_allclose(backend.embed_ids(rows), embed(loaded, SENTENCES).numpy(), atol=1e-4)
    finally:
        backend.close()


def test_served_gguf_embeddings_match_the_hf_model(encoder_gguf):
    from kompakt.serve.backend_llamacpp_embed import LlamaCppEmbeddingBackend

    loaded, path = encoder_gguf
    backend = LlamaCppEmbeddingBackend(path, n_threads=1)
    with running_server(backend) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        served = client.embeddings.create(model="tiny-bert", input=SENTENCES)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model="tiny-bert", prompt="hi")
    vectors = np.array([row.embedding for row in served.data])
    np.testing.assert_allclose(vectors, embed(loaded, SENTENCES).numpy(), atol=1e-4)
