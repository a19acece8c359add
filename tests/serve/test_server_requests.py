"""Request checks that answer as the OpenAI API does: an unknown model is a 404
model_not_found; a 400 names the field at fault and its valid range; logit_bias is applied."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import MODEL, running_server, tiny_backend  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("serve-requests"))


@pytest.fixture(scope="module")
def http(backend):
    with running_server(backend) as base, httpx.Client(base_url=base, timeout=60) as session:
        yield session


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    "path, body",
    [("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})],
)
def test_unknown_model_is_404_model_not_found(http, path, body):
    error = _error(http.post(path, json={"model": "gpt-4o", **body, "max_tokens": 1}), 404)
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "gpt-4o" in error["message"] and MODEL in error["message"]


def test_the_advertised_id_and_no_name_are_served(http):
    assert [model["id"] for model in http.get("/v1/models").json()["data"]] == [MODEL]
    for body in ({"model": MODEL}, {}):
        response = http.post("/v1/chat/completions", json={**body, "messages": HI, "max_tokens": 1})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == MODEL


def test_too_many_stop_sequences_names_stop_and_the_limit(http):
    body = {"model": MODEL, "messages": HI, "stop": [f"s{i}" for i in range(17)]}
    error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "stop"
    assert error["message"] == "stop: at most 16 stop sequences (got 17)"
    error = _error(http.post("/v1/chat/completions", json={**body, "stop": 5}), 400)
    assert error["message"].startswith("stop: a string or a list of at most 16 strings")


@pytest.mark.parametrize(
    "prompt, param",
    [([-1], "prompt"), ([[5, 6], [7, -1]], "prompt[1]"), ([10**9], "prompt")],
)
def test_token_id_out_of_range_names_the_field_and_range(http, backend, prompt, param):
    error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400)
    bad = [token for ids in (prompt if isinstance(prompt[0], list) else [prompt]) for token in ids][-1]
    assert error["param"] == param
    assert error["message"] == (
        f"{param}: token id {bad} is outside the vocabulary; valid ids are 0..{backend.vocab_size - 1}"
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_token_id_out_of_range_names_logit_bias(http, backend, path):
    body = {"model": MODEL, "messages": HI, "prompt": "hi", "logit_bias": {"-1": 5}}
    error = _error(http.post(path, json=body), 400)
    assert error["param"] == "logit_bias"
    assert error["message"] == (
        f"logit_bias: token id -1 is outside the vocabulary; valid ids are 0..{backend.vocab_size - 1}"
    )


@pytest.mark.parametrize(
    "bias, words",
    [({"x": 1}, "not a token id"), ({"5": 101}, "[-100, 100]"), ({"5": "big"}, "[-100, 100]"), ([1], "object")],
)
def test_malformed_logit_bias_is_a_400_naming_it(http, bias, words):
    error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "logit_bias": bias}), 400)
    assert error["message"].startswith("logit_bias: ") and words in error["message"]


@pytest.mark.parametrize(
    "prompt, words",
    [([], "empty"), ([[]], "not empty"), ([1, "a"], "same kind"), (["a"] * 65, "at most 64 prompts"), (3, "string")],
)
def test_malformed_prompt_says_what_is_expected(http, prompt, words):
    error = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400)
    assert error["message"].startswith("prompt: ") and words in error["message"]


def _tokens(backend, ids, **sampling) -> tuple[list[int], str]:
    from kompakt.serve.backend import Sampling

    chunks = list(backend.stream(ids, Sampling(temperature=0, **sampling)))
    return [chunk.token_id for chunk in chunks if chunk.token_id is not None], "".join(c.text for c in chunks)


def test_logit_bias_bans_and_forces_tokens(http, backend):
    ids = backend.encode_text("The cat")
    greedy, _ = _tokens(backend, ids, max_tokens=3)
    banned, banned_text = _tokens(backend, ids, max_tokens=3, logit_bias={greedy[0]: -100})
    assert banned[0] != greedy[0]
    forced, forced_text = _tokens(backend, ids, max_tokens=2, logit_bias={ids[-1]: 100})
    assert forced == [ids[-1], ids[-1]]
    # The server passes logit_bias (JSON keys are strings) through to the backend.
    body = {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0}
    served = http.post("/v1/completions", json={**body, "logit_bias": {str(greedy[0]): -100}}).json()
    assert served["choices"][0]["text"] == banned_text
    served = http.post("/v1/completions", json={**body, "max_tokens": 2, "logit_bias": {str(ids[-1]): 100}}).json()
    assert served["choices"][0]["text"] == forced_text
