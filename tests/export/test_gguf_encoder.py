"""GGUF export of sentence encoders: llama.cpp embeds like kompakt, exact grids, refusals, CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export import export, write_gguf
from kompakt.export.check import ExportCheck, ExportCheckError, run_check
from kompakt.model.compression import Quantization, update_state
from kompakt.model.sentence import Pooling
from kompakt.model.tiny_encoder import save_tiny_encoder, tiny_encoder
from kompakt.ops.gguf_grid import dequantize_blocks, quantize_blocks

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
LLAMACPP_FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", LLAMACPP_FAMILIES)
def test_tiny_encoder_runs_in_llamacpp_with_the_same_embeddings(family, tmp_path):
    loaded = tiny_encoder(family)
    result = export(loaded, format="gguf", type="f16", out=tmp_path / "enc.gguf")
    check = result.check
    assert check.passed and check.tokenization == "same", check.line()
    assert check.sentences >= 6 and check.cosine_min >= 0.999, check.line()
    fields = _fields(result.path)
    assert fields["general.architecture"] == "bert" and fields["bert.attention.causal"] is False
    assert fields["bert.pooling_type"] == int(gguf.PoolingType.MEAN)
    tensors = _tensors(result.path)
    assert not any(name.startswith("pooler") for name in tensors)
    assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    rows = loaded.model.config.max_position_embeddings - (2 if family in ("roberta", "xlm-roberta") else 0)
    assert fields["bert.context_length"] == rows and tensors["position_embd.weight"].shape[-1] == rows
    assert ("token_types.weight" in tensors) == (family != "distilbert")


def _unigram_tokenizer():
    """An XLM-R-style SentencePiece Unigram tokenizer (Metaspace, collapsed spaces, <s> ... </s>)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    words = ["\u2581the", "\u2581of", "\u2581and", "\u2581to", "ing", "ed", "er", "es", "on", "\u2581light"]
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(w, -3.0 - i / 10) for i, w in enumerate(words)] + [(c, -8.0) for c in chars]
    pieces += [("\u2581" + c, -7.5) for c in chars] + [("<mask>", 0.0)]
    core = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    core.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_max_length=128)  # fmt: skip


def test_xlm_roberta_with_a_unigram_tokenizer_runs_as_ugm(tmp_path):
    loaded = tiny_encoder("xlm-roberta")
    tokenizer = _unigram_tokenizer()
    loaded.model.resize_token_embeddings(-(-len(tokenizer) // 16) * 16, mean_resizing=False)
    loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
    result = export(loaded, format="gguf", type="f16", out=tmp_path / "xlmr.gguf")
    assert result.check.passed and result.check.tokenization == "same", result.check.line()
    fields = _fields(result.path)
    assert fields["tokenizer.ggml.model"] == "t5" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.remove_extra_whitespaces"] is True


def test_roberta_positions_drop_the_padding_rows(tmp_path):
    loaded = tiny_encoder("roberta")
    path = write_gguf(loaded, tmp_path / "r.gguf", type="f32").path
    stored = np.asarray(_tensors(path)["position_embd.weight"].data)
    table = loaded.model.embeddings.position_embeddings.weight.detach().numpy()
    offset = loaded.model.config.pad_token_id + 1
    assert np.array_equal(stored, table[offset:])


@pytest.mark.parametrize("mode, pooling_type", [("cls", "CLS"), ("lasttoken", "LAST")])
def test_cls_and_last_token_pooling_agree_in_llamacpp(mode, pooling_type, tmp_path):
    loaded = dataclasses.replace(tiny_encoder("bert"), pooling=Pooling(mode=mode, normalize=False, max_seq_length=128))
    result = export(loaded, format="gguf", type="f32", out=tmp_path / f"{mode}.gguf")
    assert _fields(result.path)["bert.pooling_type"] == int(getattr(gguf.PoolingType, pooling_type))
    assert result.check.passed and result.check.cosine_min >= 0.999, result.check.line()


@pytest.mark.parametrize("type, floor", [("q8_0", 0.99), ("q4_0", 0.9)])
def test_quantized_types_pass_their_floor(type, floor, tmp_path):
    result = export(tiny_encoder("bert"), format="gguf", type=type, out=tmp_path / f"{type}.gguf")
    assert result.check.passed and result.check.threshold == floor and result.check.cosine_min >= floor
    assert result.types_summary.startswith(f"{type}:")


def test_a_different_model_fails_the_check(tmp_path):
    """The check can fail: a file from another seed embeds differently (tokenizer identical)."""
    path = write_gguf(tiny_encoder("bert", seed=1), tmp_path / "other.gguf", type="f16").path
    check = run_check(tiny_encoder("bert", seed=0), path, format="gguf", type="f16")
    assert check.failed and check.tokenization == "same" and check.cosine_min < 0.9, check.line()
    assert "lowest cosine" in check.line()


def test_a_failed_check_leaves_only_a_rejected_file(tmp_path, monkeypatch):
    import kompakt.export.check_embed as check_embed

    monkeypatch.setitem(check_embed.MIN_COSINE, "f16", 1.01)  # nothing can reach it
    with pytest.raises(ExportCheckError, match="lowest cosine"):
        export(tiny_encoder("bert"), format="gguf", type="f16", out=tmp_path / "enc.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["enc.gguf.rejected"]


def _on_q4_0_grid(loaded) -> list[str]:
    """Put every Linear of the encoder layers on a q4_0 grid that llama.cpp's rounding would not pick."""
    gen, names = torch.Generator().manual_seed(0), []
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
            _, d, _ = quantize_blocks(module.weight.data, "q4_0")
            codes = torch.randint(2, 15, module.weight.shape, generator=gen, dtype=torch.int32)
            module.weight.data = dequantize_blocks(codes, d.abs(), None, "q4_0")
            names.append(name)
    update_state(loaded.model, quantization=Quantization("test", "q4_0", 4, 32, True, tuple(names)))
    return names


def test_encoder_on_a_q4_0_grid_keeps_its_exact_values(tmp_path):
    loaded = tiny_encoder("bert")
    names = _on_q4_0_grid(loaded)
    result = export(loaded, format="gguf", type="q4_0", out=tmp_path / "grid.gguf")
    assert result.check.passed and result.check.cosine_min >= 0.99, result.check.line()
    tensors = _tensors(result.path)
    weight = loaded.model.get_submodule("encoder.layer.0.attention.self.query").weight.detach().numpy()
    tensor = tensors["blk.0.attn_q.weight"]
    assert np.array_equal(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), weight)
    written = write_gguf(loaded, tmp_path / "again.gguf", type="q4_0")
    assert written.exact_grid_tensors == len(names) and written.requantized_blocks == 0


@pytest.mark.skipif(not hasattr(__import__("kompakt.passes.base").passes.base.PassSpec, "decoder_only"),
                    reason="quant passes run on encoders from the encoder-passes change on")  # fmt: skip
@pytest.mark.parametrize("family, fmt", [("bert", "q4_0"), ("distilbert", "q8_0"), ("roberta", "q4_0")])
def test_quant_rtn_on_an_encoder_is_written_exactly(family, fmt, tmp_path):
    from kompakt.model.load import load
    from kompakt.model.save import save_model
    from kompakt.passes.base import PassContext, build_config, get_pass

    loaded = tiny_encoder(family)
    spec = get_pass("quant.rtn")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None, seed=0)
    quantized = spec.apply(ctx, build_config(spec, {"format": fmt})).loaded
    result = export(quantized, format="gguf", type=fmt, out=tmp_path / "q.gguf")
    assert result.check.passed and result.check.cosine_min >= 0.9999, result.check.line()  # on-grid: no new error
    save_model(quantized, tmp_path / "step")
    written = write_gguf(load(tmp_path / "step", device="cpu"), tmp_path / "again.gguf", type=fmt)
    assert written.exact_grid_tensors == 24 and written.requantized_blocks == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda l: dataclasses.replace(l, pooling=Pooling("max", True, 128)), "no max pooling"),
        (lambda l: l.model.config.__setattr__("hidden_act", "relu") or l, "activation 'relu'"),
        (lambda l: l.model.config.__setattr__("position_embedding_type", "relative_key") or l, "'relative_key'"),
        (lambda l: dataclasses.replace(l, pooling=None), "no sentence pooling"),
    ],
)
def test_what_llamacpp_computes_differently_is_refused_before_writing(change, message, tmp_path):
    loaded = change(tiny_encoder("bert"))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        export(loaded, format="gguf", type="f16", out=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not any(tmp_path.glob("*.gguf*"))


def _sharpened_modernbert():
    """A tiny ModernBERT whose attention is sharp enough (q/k/v x 20) that its local window, rope
    thetas and layer pattern move the CLS state: random weights barely attend otherwise."""
    loaded = dataclasses.replace(tiny_encoder("modernbert"), pooling=Pooling("cls", False, 128))
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "Wqkv" in name:
                param.mul_(20)
    return loaded


def test_modernbert_runs_in_llamacpp_and_a_wrong_window_would_show(tmp_path):
    loaded = _sharpened_modernbert()
    result = export(loaded, format="gguf", type="f32", out=tmp_path / "mb.gguf")
    assert result.check.passed and result.check.cosine_min >= 0.9999, result.check.line()
    fields = _fields(result.path)
    assert fields["general.architecture"] == "modern-bert" and fields["modern-bert.attention.sliding_window"] == 32
    assert fields["modern-bert.attention.sliding_window_pattern"] == [False, True, False, True]
    assert fields["modern-bert.rope.freq_base"] == 160000.0 and fields["modern-bert.rope.freq_base_swa"] == 10000.0
    loaded.model.config.local_attention = 128  # written wrong: global attention everywhere
    path = write_gguf(loaded, tmp_path / "wrong.gguf", type="f32").path
    loaded.model.config.local_attention = 32
    assert run_check(loaded, path, format="gguf", type="f32").cosine_min < 0.999


def test_depth_pruned_modernbert_keeps_its_own_layer_pattern(tmp_path):
    """After dropping layer 1 the layers are full, full, sliding: not every-other any more; the
    per-layer pattern is written, and the every-other one would show in the embeddings."""
    from kompakt.model.surgery import drop_layers

    loaded, _ = drop_layers(_sharpened_modernbert(), [1])
    result = export(loaded, format="gguf", type="f32", out=tmp_path / "mb.gguf")
    assert _fields(result.path)["modern-bert.attention.sliding_window_pattern"] == [False, False, True]
    assert result.check.passed and result.check.cosine_min >= 0.9999, result.check.line()
    kept = list(loaded.model.config.layer_types)
    loaded.model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    path = write_gguf(loaded, tmp_path / "periodic.gguf", type="f32").path
    loaded.model.config.layer_types = kept
    assert run_check(loaded, path, format="gguf", type="f32").cosine_min < 0.999


def test_modernbert_with_biases_is_refused_in_one_line(tmp_path):
    loaded = tiny_encoder("modernbert")
    loaded.model.config.norm_bias = True
    with pytest.raises(UnsupportedArchitectureError, match="norm_bias") as info:
        export(loaded, format="gguf", out=tmp_path / "m.gguf")
    assert "\n" not in str(info.value) and not any(tmp_path.glob("*.gguf*"))


def test_check_line_reports_mean_and_min_cosine():
    check = ExportCheck("gguf", "q8_0", "llama.cpp", "e.gguf", threshold=0.99, cosine=0.9991, cosine_min=0.998,
                        sentences=8)  # fmt: skip
    assert check.line() == ("passed: llama.cpp, embedding cosine mean 0.99910, min 0.99800 over 8 sentences "
                            "(floor 0.99 for q8_0)")  # fmt: skip


def test_cli_exports_an_encoder_directory_and_refuses_max_pooling(tmp_path, monkeypatch, cli):
    import json

    monkeypatch.chdir(tmp_path)
    save_tiny_encoder("bert", tmp_path / "enc")
    code, out, err = cli(["export", str(tmp_path / "enc"), "--format", "gguf", "--type", "q8_0", "--out", "e.gguf"])
    assert code == 0, err
    assert "embedding cosine" in out and (tmp_path / "e.gguf.verify.json").is_file()
    config = tmp_path / "enc" / "1_Pooling" / "config.json"
    settings = json.loads(config.read_text())
    settings.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    config.write_text(json.dumps(settings))
    code, _, err = cli(["export", str(tmp_path / "enc"), "--format", "gguf", "--out", "max.gguf"])
    assert code == 2 and "no max pooling" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "max.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("type, floor", [("f16", 0.9999), ("q8_0", 0.999)])
def test_all_minilm_l6_v2_in_llamacpp(type, floor, tmp_path):
    from kompakt.model.load import load

    loaded = load("all-minilm-l6-v2", device="cpu", dtype="float32")
    result = export(loaded, format="gguf", type=type, out=tmp_path / f"minilm-{type}.gguf")
    check = result.check
    assert check.passed and check.tokenization == "same" and check.cosine_min >= floor, check.line()
    assert _fields(result.path)["tokenizer.ggml.model"] == "bert"


def test_ollama_and_hf_exports_of_an_encoder_are_checked_by_embeddings(tmp_path):
    pytest.importorskip("sentence_transformers")
    loaded = tiny_encoder("bert")
    ollama = export(loaded, format="ollama", type="q8_0", out=tmp_path / "ollama")
    assert ollama.check.passed and ollama.check.cosine_min >= 0.99, ollama.check.line()
    assert (tmp_path / "ollama" / "Modelfile").read_text() == "FROM ./model.gguf\n"  # no chat template
    hf = export(loaded, format="hf", type="f16", out=tmp_path / "hf")
    assert hf.check.runtime == "sentence-transformers" and hf.check.passed, hf.check.line()
    assert 0.999 <= hf.check.cosine_min <= hf.check.cosine <= 1.0


def test_loading_an_encoder_gguf_back_is_a_one_line_error(tmp_path):
    from kompakt.model.load import load

    path = write_gguf(tiny_encoder("bert"), tmp_path / "enc.gguf", type="f16").path
    with pytest.raises(UnsupportedArchitectureError, match="sentence-encoder GGUF") as info:
        load(path, device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("type, ftype", [("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")])
def test_tensor_types_and_size_match_llama_quantize(type, ftype, tmp_path):
    """kompakt's q8_0 / q4_0 of an encoder has llama-quantize's tensor types and file size (which
    tensors stay F32, token_embd's type), quantizing the same f16 file."""
    import ctypes

    import llama_cpp

    loaded = tiny_encoder("bert")
    source = write_gguf(loaded, tmp_path / "f16.gguf", type="f16").path
    ours = write_gguf(loaded, tmp_path / "ours.gguf", type=type).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, ftype), 1
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    types = {name: t.tensor_type for name, t in _tensors(ours).items()}
    assert types == {name: t.tensor_type for name, t in _tensors(theirs).items()}
    assert ours.stat().st_size == theirs.stat().st_size
