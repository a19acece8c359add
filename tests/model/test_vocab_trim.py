"""The tokenizer half of vocabulary trimming (kompakt.model.vocab_trim), on hand-written tokenizer.json data."""

from __future__ import annotations

from kompakt.model import vocab_trim


def _data(merges, post_processor=None) -> dict:
    vocab = {"<s>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "hell": 7, "hello": 8, "lo": 9}
    return {"model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": False},
            "added_tokens": [{"id": 0, "content": "<s>", "special": True}],
            "post_processor": post_processor, "padding": {"pad_id": 0}}  # fmt: skip


def test_merge_closure_keeps_what_builds_a_token_and_split_closure_more():
    data = _data([["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"], ["l", "o"]])
    kept = vocab_trim.merge_closure(data["model"]["merges"], data["model"]["vocab"], {"hello"})
    assert kept == {"hello", "hell", "o", "he", "ll", "h", "e", "l"}
    assert vocab_trim.split_closure(data["model"]["vocab"], {"hello"}) == kept  # "hel" is no token: no other split
    data["model"]["vocab"]["hel"] = 10
    kept = vocab_trim.split_closure(data["model"]["vocab"], {"hello"})
    assert {"hel", "lo"} <= kept  # llama.cpp's SentencePiece tokenizer could merge "hel" + "lo"
    data["model"]["byte_fallback"] = True
    assert vocab_trim.closure(data, {"hello"}) == vocab_trim.split_closure(data["model"]["vocab"], {"hello"})


def test_rewrite_renumbers_and_keeps_merges_whose_parts_survive():
    roberta = {"type": "RobertaProcessing", "sep": ["<s>", 0], "cls": ["<s>", 0]}
    template = {"type": "TemplateProcessing", "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}
    data = _data(["h e", "l l", "he ll", "hell o", "l o"], {"type": "Sequence", "processors": [roberta, template]})
    data["model"]["vocab"] = {"<pad>": 0, **{k: v + 1 for k, v in data["model"]["vocab"].items()}}
    data["added_tokens"][0]["id"] = 1
    data["post_processor"] = vocab_trim._renumber_ids(data["post_processor"], {0: 1})  # shift like the vocab
    out = vocab_trim.rewrite_tokenizer_json(data, [1, 2, 3, 4, 5, 10])  # <s> h e l o lo
    assert out["model"]["vocab"] == {"<s>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "lo": 5}
    assert out["model"]["merges"] == ["l o"]
    assert out["added_tokens"][0]["id"] == 0
    roberta, template = out["post_processor"]["processors"]
    assert roberta["sep"] == ["<s>", 0] and template["special_tokens"]["<s>"]["ids"] == [0]
    config = vocab_trim.renumber_tokenizer_config({"added_tokens_decoder": {"1": {"content": "<s>"}, "0": {}}}, {1: 0})
    assert config["added_tokens_decoder"] == {"0": {"content": "<s>"}}
