"""/v1/embeddings on a tiny encoder, through the official openai client and raw HTTP; each task's
model refuses the other task's routes (an encoder asked to chat, a decoder asked for embeddings)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kompakt.model.encode import embed  # noqa: E402
from kompakt.model.tiny import tiny_encoder  # noqa: E402
from kompakt.serve.backend_embeddings import EmbeddingBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import running_server, tiny_backend  # noqa: E402

MODEL = "tiny-bert"
SENTENCES = ["A cat sat on the mat.", "Stock prices fell sharply on Monday.", "hi", "The cat is on the mat!"]


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return tiny_encoder("bert")


@pytest.fixture(scope="module")
def backend(loaded):
    return EmbeddingBackend(loaded, model_id=MODEL)


@pytest.fixture(scope="module")
def url(backend):
    with running_server(backend, max_embedding_tokens=4096) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as session:
        yield session


def _matrix(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    rows = [item.embedding for item in response.data]
    if isinstance(rows[0], str):  # asked for base64 explicitly: the client hands the strings over
        rows = [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows]
    return np.array(rows, dtype=np.float32)


def test_client_embeddings_equal_embed(client, loaded):
    """Unasked, the openai client requests base64 and decodes it; every format gives embed()'s vectors."""
    expected = embed(loaded, SENTENCES).numpy()
    for fmt in (openai.omit, "base64", "float"):
        response = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format=fmt)
        assert response.model == MODEL and response.object == "list"
        np.testing.assert_allclose(_matrix(response), expected, atol=1e-5)
    tokens = sum(len(ids) for ids in loaded.tokenizer(SENTENCES)["input_ids"])
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens


def test_single_string_and_token_ids(client, loaded):
    one = client.embeddings.create(model=MODEL, input=SENTENCES[1])
    np.testing.assert_allclose(_matrix(one)[0], embed(loaded, [SENTENCES[1]])[0].numpy(), atol=1e-5)
    ids = loaded.tokenizer(SENTENCES[:2])["input_ids"]  # special tokens included: ids round-trip texts
    by_ids = client.embeddings.create(model=MODEL, input=ids)
    np.testing.assert_allclose(_matrix(by_ids), embed(loaded, SENTENCES[:2]).numpy(), atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_raw_float_response_shape(http):
    body = http.post("/v1/embeddings", json={"input": ["x", "y"], "model": MODEL}).json()
    assert body["object"] == "list" and body["model"] == MODEL and set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert [(item["object"], item["index"]) for item in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert len(body["data"][0]["embedding"]) == 64 and isinstance(body["data"][0]["embedding"][0], float)
    raw = http.post("/v1/embeddings", json={"input": "x", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    np.testing.assert_allclose(decoded, body["data"][0]["embedding"], atol=1e-7)


def test_dimensions_truncate_and_renormalise(client, loaded):
    short = _matrix(client.embeddings.create(model=MODEL, input=SENTENCES, dimensions=16, encoding_format="float"))
    head = embed(loaded, SENTENCES).numpy()[:, :16]
    np.testing.assert_allclose(short, head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.embeddings.create(model=MODEL, input="x", dimensions=65)


def test_long_text_is_cut_to_the_limit_or_refused(client, loaded, backend):
    long = "word " * 400  # well over the tiny model's 128 tokens
    response = client.embeddings.create(model=MODEL, input=[long, "short"], encoding_format="float")
    np.testing.assert_allclose(_matrix(response), embed(loaded, [long, "short"]).numpy(), atol=1e-5)
    assert response.usage.prompt_tokens == backend.context_length + len(loaded.tokenizer("short")["input_ids"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=long, extra_body={"truncate": False})
    assert refused.value.code == "context_length_exceeded" and "128" in refused.value.message


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"input": []}, "empty list"),
        ({"input": ""}, None),  # an empty string embeds ([CLS] [SEP]), as sentence-transformers does
        ({"input": [1, "a"]}, "expected a string"),
        ({"input": [[5, 6], []]}, "not empty"),
        ({"input": [10**6]}, "outside the vocabulary"),
        ({"input": [5] * 200}, "at most 128"),
        ({"input": ["a"] * 2049}, "at most 2048 inputs"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "model": "other"}, "does not exist"),
    ],
)
def test_bad_requests_get_openai_errors(http, body, fragment):
    response = http.post("/v1/embeddings", json=body)
    if fragment is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code in (400, 404), response.text
    assert fragment in response.json()["error"]["message"]


def test_request_token_budget(backend):
    with running_server(backend, max_embedding_tokens=10) as base:
        response = httpx.post(f"{base}/v1/embeddings", json={"input": SENTENCES}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_tokens"


def test_encoder_refuses_chat_and_completions(client, http):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_supported" and "embedding model" in refused.value.message
    response = http.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 400 and "/v1/embeddings" in response.json()["error"]["message"]
    assert [model["id"] for model in http.get("/v1/models").json()["data"]] == [MODEL]
    assert http.get("/health").json()["serves"] == "/v1/embeddings"


def test_decoder_refuses_embeddings(tmp_path):
    """A causal LM is not an embedding model: a clear 400 naming the fix, not pooled hidden states."""
    with running_server(tiny_backend(tmp_path)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="tiny-llama", input="hello")
    assert refused.value.status_code == 400 and refused.value.code == "model_not_supported"
    assert "text-generation model" in refused.value.message and "all-minilm-l6-v2" in refused.value.message


@pytest.mark.parametrize("family", ["distilbert", "roberta", "modernbert"])
def test_backend_equals_embed_on_other_families(family):
    """Families whose forward takes no token_type_ids (DistilBERT, ModernBERT) or pads with id 1."""
    loaded = tiny_encoder(family)
    backend = EmbeddingBackend(loaded)
    rows = backend.tokenize(SENTENCES)
    np.testing.assert_allclose(backend.embed_ids(rows), embed(loaded, SENTENCES).numpy(), atol=1e-5)


def test_open_backend_serves_a_saved_encoder_as_embeddings(tmp_path):
    from kompakt.model.tiny import save_tiny_encoder
    from kompakt.serve.backend_choice import open_backend

    save_tiny_encoder("bert", tmp_path / "enc")
    backend = open_backend(tmp_path / "enc")
    assert backend.task == "embed" and backend.dimensions == 64 and backend.context_length == 128


@pytest.mark.slow
def test_served_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
    """The embedded all-MiniLM-L6-v2 served as `kompakt serve all-minilm-l6-v2` would serve it."""
    from kompakt.serve.backend_choice import open_backend

    backend = open_backend("all-minilm-l6-v2")
    texts = ["How do I reset my password?", "I forgot my password and need to change it.", "The tide comes in at dawn."]
    with running_server(backend) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        vectors = _matrix(client.embeddings.create(model="all-minilm-l6-v2", input=texts))
    np.testing.assert_allclose(vectors, embed(backend.loaded, texts).numpy(), atol=1e-5)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]
