"""The OpenAI-compatible server on a tiny model: official client, raw HTTP edge cases, auth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import API_KEY, MODEL, running_server, tiny_backend  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def url(backend):
    with running_server(backend, api_key=API_KEY, max_tokens_cap=32) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as session:
        yield session


def test_models_list(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny-llama"]


def test_chat_non_streaming_greedy_is_deterministic(client):
    first = client.chat.completions.create(model="tiny-llama", messages=HI, max_tokens=8, temperature=0)
    again = client.chat.completions.create(model="tiny-llama", messages=HI, max_tokens=8, temperature=0)
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 0 and 0 < first.usage.completion_tokens <= 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_chat_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=8, temperature=1.0, seed=7)
    texts = {client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_chat_streaming_matches_non_streaming(client):
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [chunk for chunk in chunks if chunk.choices]
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in content[:-1])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequence_cuts_the_text(client):
    whole = (
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0).choices[0].message.content
    )
    if len(whole) < 4:
        pytest.skip("the tiny model ended too early to pick a stop string")
    stop = whole[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_max_tokens_is_capped_server_wide(client):
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10_000, temperature=0)
    assert reply.usage.completion_tokens <= 32


def test_completion_echo_logprobs_for_lm_eval(client, backend):
    """lm-evaluation-harness local-completions: echo, logprobs=1, max_tokens=1, token-id prompts."""
    prompt = "The cat sat"
    ids = backend.encode_text(prompt)
    out = client.completions.create(
        model=MODEL, prompt=[ids, ids[:-2]], echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    assert [choice.index for choice in out.choices] == [0, 1]
    first = out.choices[0].logprobs
    assert len(first.token_logprobs) == len(ids) + 1 and first.token_logprobs[0] is None
    assert all(value <= 0 for value in first.token_logprobs[1:])
    assert all(max(top.values()) >= value for top, value in zip(first.top_logprobs[1:], first.token_logprobs[1:]))
    assert out.choices[0].text.startswith(prompt)
    assert out.usage.prompt_tokens == 2 * len(ids) - 2
    # Scores agree with a direct forward pass of the backend.
    expected = backend.score(ids, 1).logprobs[1:]
    assert first.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)


def test_completion_max_tokens_zero_scores_prompt_only(client):
    out = client.completions.create(model=MODEL, prompt="abc", echo=True, logprobs=2, max_tokens=0)
    block = out.choices[0].logprobs
    assert out.choices[0].text == "abc" and len(block.tokens) == 3 and block.text_offset == [0, 1, 2]
    assert all(len(top) == 2 for top in block.top_logprobs[1:])


def test_completion_streaming(client):
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, stream=True))
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL},  # messages missing
        {"model": MODEL, "messages": "hi"},
        {"model": MODEL, "messages": [123]},
        {"model": MODEL, "messages": [{}]},
        {"model": MODEL, "messages": [{"role": 5, "content": "x"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": HI, "temperature": "hot"},
        {"model": MODEL, "messages": HI, "max_tokens": -1},
        {"model": MODEL, "messages": HI, "n": 3},
        ["not", "an", "object"],
    ],
)
def test_malformed_chat_bodies_get_400_with_error_shape(http, body):
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize(
    "body", [{"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": "x", "logprobs": 99}]
)
def test_malformed_completion_bodies_get_400(http, body):
    response = http.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_invalid_json_gets_400(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_prompt_longer_than_context_gets_context_length_exceeded(http, backend):
    long = "x" * (backend.context_length + 10)
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": long})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_wrong_or_missing_api_key_gets_401(url, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
        response = httpx.request(method, url + path, headers=headers, json={"model": MODEL, "messages": HI}, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_with_wrong_key_raises_authentication_error(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_health_is_public(url):
    response = httpx.get(url + "/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_unknown_route_gets_openai_error_shape(http):
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_health_is_503_while_loading(tmp_path):
    import threading

    release = threading.Event()

    def slow_loader():
        release.wait(30)
        raise RuntimeError("never mind")

    with running_server(slow_loader) as base:
        response = httpx.get(base + "/health", timeout=30)
        assert response.status_code == 503 and response.json()["status"] == "loading"
        chat = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=30)
        assert chat.status_code == 503 and json.loads(chat.text)["error"]["code"] == "model_not_ready"
        release.set()


def test_lm_evaluation_harness_local_completions_scores_through_the_server(backend):
    """lm-eval's own client (local-completions, tokenized requests) against the server."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with running_server(backend) as base:
        lm = LocalCompletionsAPI(
            base_url=f"{base}/v1/completions",
            model="tiny-llama",
            tokenizer=str(backend.loaded.path),
            tokenizer_backend="huggingface",
            num_concurrent=1,
            max_retries=1,
        )
        request = Instance(request_type="loglikelihood", doc={}, arguments=("The cat", " sat"), idx=0)
        [(logprob, _greedy)] = lm.loglikelihood([request])
    tokenizer = backend.loaded.tokenizer
    ids, context = tokenizer("The cat sat")["input_ids"], tokenizer("The cat")["input_ids"]
    assert logprob == pytest.approx(sum(backend.score(ids, 1).logprobs[len(context) :]), abs=1e-3)


def test_chat_template_refusal_is_a_400_not_a_500():
    from kompakt.errors import ConfigError
    from kompakt.model.tiny import tiny_model
    from kompakt.serve.backend_transformers import TransformersBackend

    loaded = tiny_model("llama")
    loaded.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    backend = TransformersBackend(loaded)
    with pytest.raises(ConfigError, match="roles must alternate"):
        backend.encode_chat(HI)
    with running_server(backend) as base:
        response = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=30)
    assert response.status_code == 400 and "alternate" in response.json()["error"]["message"]
