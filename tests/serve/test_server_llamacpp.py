"""The llama.cpp backend (skipped without llama-cpp-python): a tiny GGUF exported by kompakt,
served over the OpenAI API; the embedded SmolLM2 Q4_1 GGUF as a slow test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))
from test_server_support import running_server  # noqa: E402

from kompakt.serve.backend import Sampling  # noqa: E402
from kompakt.serve.backend_choice import choose_backend  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from kompakt.export.gguf import export_gguf
    from kompakt.model.tiny import tiny_model

    return export_gguf(tiny_model("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf", type="f16")


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    from kompakt.serve.backend_llamacpp import LlamaCppBackend

    loaded = LlamaCppBackend(tiny_gguf, n_threads=1)
    yield loaded
    loaded.close()


def test_gguf_files_choose_llamacpp(tiny_gguf):
    assert choose_backend(tiny_gguf, "auto") == "llamacpp"
    assert choose_backend(tiny_gguf, "transformers") == "transformers"


def test_chat_template_from_gguf_metadata(backend):
    assert backend.decode(backend.encode_chat(HI)) == "user\nhi\nassistant\n"  # ChatML, specials dropped


def test_greedy_generation_is_deterministic_and_bounded(backend):
    ids = backend.encode_text("Hello")
    first = list(backend.stream(ids, Sampling(max_tokens=6, temperature=0)))
    again = list(backend.stream(ids, Sampling(max_tokens=6, temperature=0)))
    assert first == again
    assert sum(chunk.token_id is not None for chunk in first) <= 6 and first[-1].finish_reason in ("stop", "length")


def test_logit_bias_bans_and_forces_tokens(backend):
    ids = backend.encode_text("Hello")
    greedy = [chunk.token_id for chunk in backend.stream(ids, Sampling(max_tokens=3, temperature=0))]
    banned = list(backend.stream(ids, Sampling(max_tokens=3, temperature=0, logit_bias={greedy[0]: -100})))
    assert banned[0].token_id != greedy[0]
    forced = list(backend.stream(ids, Sampling(max_tokens=2, temperature=0, logit_bias={ids[-1]: 100})))
    assert [chunk.token_id for chunk in forced[:2]] == [ids[-1], ids[-1]]


def test_chunked_scoring_matches_unchunked(backend, monkeypatch):
    from kompakt.serve import backend_llamacpp

    ids = backend.encode_text("The quick brown fox jumps over the lazy dog")
    whole = backend.score(ids, 2)
    monkeypatch.setattr(backend_llamacpp, "SCORE_CHUNK_TOKENS", 3)
    chunked = backend.score(ids, 2)
    assert chunked.logprobs[1:] == pytest.approx(whole.logprobs[1:], abs=1e-6) and chunked.top == whole.top


def test_served_over_openai_api(backend):
    with running_server(backend) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == "tiny"
        whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0)
        chunks = list(
            client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, stream=True)
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        scored = client.completions.create(
            model="tiny", prompt="The cat", echo=True, logprobs=1, max_tokens=1, temperature=0
        )
        block = scored.choices[0].logprobs
        assert block.token_logprobs[0] is None and all(value <= 0 for value in block.token_logprobs[1:])
        assert scored.choices[0].text.startswith("The cat")


@pytest.mark.slow
def test_embedded_smollm2_q4_gguf_matches_the_hf_chat_template():
    from transformers import AutoTokenizer

    from kompakt.model.embedded import embedded_gguf
    from kompakt.model.load import resolve_model_dir
    from kompakt.serve.backend_llamacpp import LlamaCppBackend

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    backend = LlamaCppBackend(embedded_gguf("smollm2-135m"), n_ctx=512, n_threads=2)
    try:
        ids = backend.encode_chat(messages)
        hf = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        chunks = list(backend.stream(ids, Sampling(max_tokens=16, temperature=0)))
        assert "".join(chunk.text for chunk in chunks).strip()
    finally:
        backend.close()


def test_kompakt_chat_backend_llamacpp(tiny_gguf, monkeypatch, capsys):
    from kompakt.cli.app import main

    lines = iter(["hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("kompakt.model.load.load", lambda *args, **kwargs: pytest.fail("took the transformers path"))
    main(["chat", str(tiny_gguf), "--backend", "llamacpp", "--max-new-tokens", "4", "--temperature", "0"])
    captured = capsys.readouterr()
    assert captured.err.startswith("tiny")
    assert captured.out.strip()
