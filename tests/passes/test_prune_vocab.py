"""prune.vocab on tiny models with small real BPE tokenizers (GPT-2 style and SentencePiece style
with byte fallback): kept-token text tokenizes identically, the saved step is a standard model
transformers loads, ids are renumbered everywhere, and bad input gets one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from kompakt.errors import ConfigError, DataError, UnsupportedArchitectureError
from kompakt.evaluate.perplexity import forward_logits, window_prefix
from kompakt.model.compression import Quantization, update_state
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.rundir.stepsave import save_step_model
from vocab_tokenizers import ENGLISH, OTHER, byte_fallback_tokenizer, byte_level_tokenizer, corpus, model_with

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = get_pass("prune.vocab")
STYLES = {"byte_level": byte_level_tokenizer, "byte_fallback": byte_fallback_tokenizer}


def _trim(loaded, tmp_path, ids=None, **values):
    ids = ids if ids is not None else _ids(loaded.tokenizer, corpus())
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: ids.reshape(1, -1), work_dir=work)
    return SPEC.apply(ctx, build_config(SPEC, values))


def _ids(tokenizer, texts) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])


def _tokens(tokenizer, text: str, special: bool = True) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=special)["input_ids"])


@pytest.fixture(scope="module", params=sorted(STYLES))
def trimmed(request, tmp_path_factory):
    """(original, report, reloaded by plain transformers) for each tokenizer style, Gemma 3 layout (tied)."""
    tmp = tmp_path_factory.mktemp(request.param)
    original = model_with(STYLES[request.param](), "gemma3_text")
    report = _trim(copy.deepcopy(original), tmp)
    save_step_model(report.loaded, tmp / "step", torch.float32, {})
    model = AutoModelForCausalLM.from_pretrained(tmp / "step")
    return original, report, model, AutoTokenizer.from_pretrained(tmp / "step")


def test_kept_text_tokenizes_identically_and_other_text_still_tokenizes(trimmed):
    original, report, _, tokenizer = trimmed
    before, after = original.tokenizer, tokenizer
    assert len(after) < len(before)
    for text in corpus(seed=9, n=20):  # new sentences, same words: made of kept tokens
        assert _tokens(after, text) == _tokens(before, text)
        assert after.decode(after(text, add_special_tokens=False)["input_ids"]) == text
    foreign = " ".join(OTHER) + " ÿ€ 😀"
    pieces = after(foreign, add_special_tokens=False)["input_ids"]
    assert len(pieces) > len(before(foreign, add_special_tokens=False)["input_ids"])
    assert after.decode(pieces) == foreign  # unkept words fall apart into kept pieces, at worst bytes


def test_rows_follow_their_tokens(trimmed):
    original, report, model, tokenizer = trimmed
    old_ids = json.loads(report.files["vocab_map.json"].read_text())["old_ids"]
    assert model.config.vocab_size == len(old_ids) == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    before = original.model.get_input_embeddings().weight
    after = model.get_input_embeddings().weight
    for new, old in enumerate(old_ids):
        assert original.tokenizer.convert_ids_to_tokens(old) == tokenizer.convert_ids_to_tokens(new)
    torch.testing.assert_close(after, before[old_ids])
    text = corpus(seed=3, n=1)[0]
    with torch.no_grad():
        ref = original.model(torch.tensor([original.tokenizer(text)["input_ids"]])).logits[0]
        got = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0]
    torch.testing.assert_close(got, ref[:, old_ids], rtol=1e-4, atol=1e-4)  # same text, same logits


def test_special_ids_are_renumbered_everywhere(trimmed):
    _, report, model, tokenizer = trimmed
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        assert tokenizer.convert_ids_to_tokens(token_id) == f"<{name}>"
        assert getattr(model.config, f"{name}_token_id") == token_id
        assert getattr(model.generation_config, f"{name}_token_id") == token_id
    assert "<unused1>" in tokenizer.get_vocab()  # specials: all keeps every special added token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False)
    assert "<|im_start|>" in _tokens(tokenizer, chat, special=False)


def test_untied_head_and_named_specials(tmp_path):
    original = model_with(byte_level_tokenizer(), "llama")
    report = _trim(copy.deepcopy(original), tmp_path, specials="named")
    model, tokenizer = report.loaded.model, report.loaded.tokenizer
    old_ids = json.loads(report.files["vocab_map.json"].read_text())["old_ids"]
    assert model.lm_head.weight.shape[0] == len(old_ids) and model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, original.model.lm_head.weight[old_ids])
    assert "<unused1>" not in tokenizer.get_vocab() and "<|im_start|>" in tokenizer.get_vocab()  # template keeps it


def test_min_count_keeps_fewer(tmp_path):
    loaded = model_with(byte_level_tokenizer(), "llama")
    ids = _ids(loaded.tokenizer, corpus() + [" ".join(OTHER)])  # the OTHER words once each
    once = _trim(copy.deepcopy(loaded), tmp_path, ids=ids).details
    often = _trim(copy.deepcopy(loaded), tmp_path, ids=ids, min_count=5).details
    assert often["vocab_size"][1] < once["vocab_size"][1]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_expected_keeps_the_tokens_the_model_expects_most_in_the_corpus(tmp_path, style):
    loaded = model_with(STYLES[style](), "llama")
    ids = _ids(loaded.tokenizer, corpus(words=ENGLISH[:8]))
    base = _trim(copy.deepcopy(loaded), tmp_path / "base", ids=ids)
    more = _trim(copy.deepcopy(loaded), tmp_path / "more", ids=ids, expected=30, expected_positions=600)
    assert more.details["expected_added"] == 30 and more.details["expected"] == 30
    kept_before = set(json.loads(base.files["vocab_map.json"].read_text())["old_ids"])
    added = set(json.loads(more.files["vocab_map.json"].read_text())["old_ids"]) - kept_before
    prefix = window_prefix(loaded)  # the windows start as the evaluator's do (<bos> where the tokenizer adds it)
    with torch.no_grad():  # the model's next-token probabilities over the first 600 corpus positions
        probs = torch.cat([torch.softmax(forward_logits(loaded.model, ids[s : min(s + 512, 600)][None], prefix)[0], -1)
                           for s in (0, 512)])  # fmt: skip
    mass = probs.sum(0)
    ranked = [i for i in torch.argsort(mass, descending=True).tolist() if i not in kept_before]
    assert set(ranked[:30]) <= added  # the 30 most expected (the rest of `added` is their merge closure)
    removed_before = 1 - probs[:, sorted(kept_before)].sum(-1).mean()
    removed_after = 1 - probs[:, sorted(kept_before | added)].sum(-1).mean()
    assert removed_after < removed_before


def test_data_path_is_the_corpus(tmp_path):
    loaded = model_with(byte_fallback_tokenizer(), "llama")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus(words=ENGLISH[:6])))
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: pytest.fail("used calibration"),
                      work_dir=tmp_path)  # fmt: skip
    report = SPEC.apply(ctx, build_config(SPEC, {"data": str(path)}))
    assert report.details["used"] <= 20


def test_bad_input_one_line_errors(tmp_path):
    loaded = model_with(byte_level_tokenizer(), "llama")
    specials_only = torch.tensor([loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id] * 8)
    with pytest.raises(DataError, match="no token besides special tokens"):
        _trim(loaded, tmp_path, ids=specials_only)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError):
        _trim(loaded, tmp_path, data=str(empty))
    with pytest.raises(ConfigError, match="min_count"):
        build_config(SPEC, {"min_count": 0})
    with pytest.raises(ConfigError, match="specials"):
        build_config(SPEC, {"specials": "some"})
    with pytest.raises(ConfigError, match="expected"):
        build_config(SPEC, {"expected": -1})


def test_tokenizer_it_cannot_rewrite_is_named(tmp_path):
    core = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "cat": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    loaded = model_with(byte_level_tokenizer(), "llama")
    loaded.tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    with pytest.raises(UnsupportedArchitectureError, match="'WordLevel'"):
        _trim(loaded, tmp_path, ids=torch.tensor([1, 2, 1]))


def test_quantized_head_is_refused(tmp_path):
    loaded = model_with(byte_level_tokenizer(), "llama")
    grid = Quantization(method="rtn", format="int8", bits=8, group_size=None, symmetric=True, modules=("lm_head",))
    update_state(loaded, quantization=grid)
    with pytest.raises(ConfigError, match="lm_head .* is quantized; run prune.vocab before"):
        _trim(loaded, tmp_path)


GEMMA_CORPUS = """The river flows through the old town, past the market and the church.
In the morning the market opens early, and farmers bring bread, cheese and fresh fruit.
Children walk to school along the river while their parents drink coffee in the square.
The church was built in the twelfth century and restored after a fire in 1850.
Visitors come in summer to see the bridge, the gardens and the small museum of local history."""


@pytest.mark.slow
def test_gemma3_trimmed_reloads_with_transformers_and_tokenizes_identically(tmp_path):
    import kompakt

    original = kompakt.load("gemma3-270m")
    path = tmp_path / "corpus.txt"
    path.write_text(GEMMA_CORPUS)
    ctx = PassContext(loaded=copy.deepcopy(original), original=lambda: original,
                      calibration=lambda: pytest.fail("used calibration"), work_dir=tmp_path)  # fmt: skip
    report = SPEC.apply(ctx, build_config(SPEC, {"data": str(path)}))
    save_step_model(report.loaded, tmp_path / "step", original.storage_dtype, {})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "step")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step")
    old_ids = json.loads(report.files["vocab_map.json"].read_text())["old_ids"]
    assert model.config.vocab_size == len(old_ids) == len(tokenizer) < 262144 // 4
    kept_text = "Children walk to school along the river, past the market and the church in the morning."
    assert set(_tokens(original.tokenizer, kept_text)) <= set(tokenizer.get_vocab())  # made of kept tokens
    assert _tokens(tokenizer, kept_text) == _tokens(original.tokenizer, kept_text)
    ids = tokenizer(kept_text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = original.model(original.tokenizer(kept_text, return_tensors="pt")["input_ids"]).logits[0]
        got = model(ids).logits[0]
    torch.testing.assert_close(got, ref[:, old_ids], rtol=1e-4, atol=1e-3)
    foreign = "Der Fluss fließt durch die Altstadt — 川が流れる"
    assert tokenizer.decode(tokenizer(foreign, add_special_tokens=False)["input_ids"]) == foreign


def test_gguf_pre_tokenizer_name_survives_trimming(tmp_path, monkeypatch):
    """llama.cpp names a byte-level pre-tokenizer by a hash of ids, which trimming changes: the
    original's name is recorded in tokenizer_config.json and the GGUF export reads it back."""
    from hashlib import sha256

    from kompakt.export import gguf_tokenizer

    loaded = model_with(byte_level_tokenizer(), "llama")
    digest = sha256(str(loaded.tokenizer.encode(gguf_tokenizer.CHKTXT)).encode()).hexdigest()
    monkeypatch.setitem(gguf_tokenizer.PRE_TOKENIZERS, digest, "gpt2")
    report = _trim(copy.deepcopy(loaded), tmp_path)
    save_step_model(report.loaded, tmp_path / "step", torch.float32, {})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "step")
    assert sha256(str(tokenizer.encode(gguf_tokenizer.CHKTXT)).encode()).hexdigest() not in gguf_tokenizer.PRE_TOKENIZERS
    assert gguf_tokenizer.recognised_pre(tokenizer) == "gpt2"
