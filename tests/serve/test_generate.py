"""stream_generate on tiny random models: streaming == whole decode == transformers' greedy generate."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model.tiny import tiny_model, tiny_tokenizer
from kompakt.serve.generate import (
    IncrementalDecoder,
    encode_input,
    generate_text,
    stop_token_ids,
    stream_chunks,
    stream_generate,
)

PROMPT = "Hello there"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _hf_greedy(loaded, ids: list[int], n: int) -> str:
    out = loaded.model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=sorted(stop_token_ids(loaded)),
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


# gemma3_text: 70 new tokens run past its 64-token sliding window, exercising that cache.
@pytest.mark.parametrize(("family", "n"), [("llama", 24), ("qwen2", 24), ("gemma3_text", 70)])
def test_stream_matches_transformers_greedy(family, n):
    loaded = tiny_model(family)
    pieces = list(stream_generate(loaded, PROMPT, max_new_tokens=n, temperature=0))
    assert "".join(pieces) == _hf_greedy(loaded, encode_input(loaded, PROMPT), n)


def test_pieces_concatenate_to_whole_text(llama):
    pieces = list(stream_generate(llama, MESSAGES, max_new_tokens=32, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == generate_text(llama, MESSAGES, max_new_tokens=32, temperature=0)
    assert "".join(pieces) == _hf_greedy(llama, encode_input(llama, MESSAGES), 32)


def test_greedy_is_deterministic(llama):
    first = generate_text(llama, PROMPT, max_new_tokens=16, temperature=0, seed=1)
    assert first == generate_text(llama, PROMPT, max_new_tokens=16, temperature=0, seed=2)


def test_seed_makes_sampling_reproducible(llama):
    def sample(seed):
        chunks = stream_chunks(llama, PROMPT, max_new_tokens=24, temperature=3.0, top_p=1.0, seed=seed)
        return [chunk.token_id for chunk in chunks]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_p_keeps_nucleus(llama):
    # A tiny top_p keeps only the most likely token: sampling collapses to greedy.
    greedy = generate_text(llama, PROMPT, max_new_tokens=12, temperature=0)
    assert generate_text(llama, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_max_new_tokens_respected(llama):
    # Greedy tiny llama runs on without a stop token, so the limit is what ends it.
    chunks = list(stream_chunks(llama, PROMPT, max_new_tokens=5, temperature=0))
    produced = [chunk.token_id for chunk in chunks if chunk.token_id is not None]
    assert len(produced) == 5
    assert chunks[-1].finish_reason == "length"
    sampled = list(stream_chunks(llama, PROMPT, max_new_tokens=5, temperature=1.0, seed=0))
    assert len([c for c in sampled if c.token_id is not None]) <= 5


def test_stops_at_generation_config_eos_list():
    loaded = tiny_model("llama")
    first = next(iter(stream_chunks(loaded, PROMPT, max_new_tokens=4, temperature=0))).token_id
    # generation_config.eos_token_id may be a list (SmolLM2: <|im_end|> next to <|endoftext|>).
    loaded.model.generation_config.eos_token_id = [1, first]
    assert first in stop_token_ids(loaded)
    chunks = list(stream_chunks(loaded, PROMPT, max_new_tokens=4, temperature=0))
    assert [c.token_id for c in chunks] == [None]
    assert chunks[-1].finish_reason == "stop"


def test_end_of_turn_special_token_stops(llama):
    assert llama.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(llama)


def test_stop_string_cuts_output(llama):
    full = generate_text(llama, PROMPT, max_new_tokens=32, temperature=0)
    stop = full[6:9]
    cut = generate_text(llama, PROMPT, max_new_tokens=32, temperature=0, stop=["@@never@@", stop])
    assert cut == full[: full.find(stop)]
    chunks = list(stream_chunks(llama, PROMPT, max_new_tokens=32, temperature=0, stop=stop))
    assert chunks[-1].finish_reason == "stop"


def test_messages_use_chat_template(llama):
    ids = encode_input(llama, MESSAGES)
    text = llama.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_no_chat_template_falls_back_to_plain_text(caplog):
    loaded = tiny_model("gemma3_text")
    loaded.tokenizer.chat_template = None
    with caplog.at_level(logging.WARNING, logger="kompakt.serve.generate"):
        ids = encode_input(loaded, MESSAGES)
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "system: Be brief.\nuser: hi\nassistant:"
    assert "no chat template" in caplog.text
    text = generate_text(loaded, MESSAGES, max_new_tokens=8, temperature=0)
    assert text == generate_text(loaded, "system: Be brief.\nuser: hi\nassistant:", max_new_tokens=8, temperature=0)


def test_incremental_decoder_handles_multibyte_utf8():
    tokenizer = tiny_tokenizer()  # one token per byte: "é", "€", "😀" span 2-4 tokens
    text = "héllo € 😀 ok"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_bad_parameters_raise_config_error(llama):
    with pytest.raises(ConfigError):
        list(stream_generate(llama, PROMPT, temperature=-1))
    with pytest.raises(ConfigError):
        list(stream_generate(llama, PROMPT, max_new_tokens=0))
    with pytest.raises(ConfigError):
        list(stream_generate(llama, "x" * (llama.context_length + 1)))
    with pytest.raises(ConfigError):
        list(stream_generate(llama, []))


def test_closing_the_stream_early_is_clean(llama):
    stream = stream_generate(llama, PROMPT, max_new_tokens=50, temperature=0)
    next(stream)
    stream.close()  # no thread left behind, nothing raised


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("kompakt.model.load") is None, reason="kompakt.model.load not written yet")
def test_smollm2_knows_paris():
    from kompakt.model.load import load

    loaded = load("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = "".join(stream_generate(loaded, messages, max_new_tokens=24, temperature=0))
    assert "Paris" in text
