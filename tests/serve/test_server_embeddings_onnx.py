"""An ONNX encoder directory served on onnxruntime answers /v1/embeddings like the model it came from."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from kompakt.errors import ConfigError  # noqa: E402
from kompakt.model.encode import embed  # noqa: E402
from kompakt.model.tiny import tiny_encoder  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import running_server  # noqa: E402

SENTENCES = ["A cat sat on the mat.", "Stock prices fell sharply on Monday.", "hi", "word " * 300]


@pytest.fixture(scope="module")
def encoder_onnx(tmp_path_factory):
    """(the tiny BERT, its f32 ONNX directory written and checked by kompakt's exporter)."""
    from kompakt.export.api import export

    loaded = tiny_encoder("bert")
    return loaded, export(loaded, format="onnx", type="f32", out=tmp_path_factory.mktemp("onnx") / "tiny-bert-onnx").path


def test_open_backend_picks_onnxruntime_for_an_onnx_directory(encoder_onnx):
    from kompakt.serve.backend_choice import open_backend

    loaded, directory = encoder_onnx
    backend = open_backend(directory)
    try:
        assert (backend.kind, backend.task, backend.dimensions, backend.model_id) == ("onnxruntime", "embed", 64,
                                                                                     "tiny-bert-onnx")  # fmt: skip
        rows = backend.tokenize(SENTENCES)  # the exported tokenizer and cut: as embed()'s
        assert rows == loaded.tokenizer(SENTENCES, truncation=True, max_length=128)["input_ids"]
        np.testing.assert_allclose(backend.embed_ids(rows), embed(loaded, SENTENCES).numpy(), atol=1e-4)
    finally:
        backend.close()


def test_served_onnx_embeddings_match_the_model(encoder_onnx):
    from kompakt.serve.backend_onnx_embed import OnnxEmbeddingBackend

    loaded, directory = encoder_onnx
    backend = OnnxEmbeddingBackend(directory, n_threads=1)
    with running_server(backend) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        served = client.embeddings.create(model="tiny-bert-onnx", input=SENTENCES)
        with pytest.raises(openai.BadRequestError, match="at most 128"):
            client.embeddings.create(model="tiny-bert-onnx", input=SENTENCES, extra_body={"truncate": False})
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model="tiny-bert-onnx", prompt="hi")
    vectors = np.array([row.embedding for row in served.data])
    np.testing.assert_allclose(vectors, embed(loaded, SENTENCES).numpy(), atol=1e-4)


def test_the_onnxruntime_backend_refuses_what_is_no_onnx_directory(tmp_path):
    from kompakt.serve.backend_choice import choose_backend

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for source in (tmp_path, tmp_path / "model.gguf"):
        with pytest.raises(ConfigError, match="runs ONNX encoder directories; export one with"):
            choose_backend(source, "onnxruntime")


def test_choosing_the_engine_for_a_gguf_still_imports_no_torch(tmp_path):
    """choose_backend now looks for ONNX directories; a .gguf must not pay for torch because of it."""
    import subprocess

    code = ("import sys; from kompakt.serve.backend_choice import choose_backend; "
            f"choose_backend({str(tmp_path / 'small.gguf')!r}); print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
