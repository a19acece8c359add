"""GGUF exports run in llama.cpp (llama-cpp-python, the `kompakt[llamacpp]` extra): same logits,
same tokenization, and byte-identical tensors to llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from kompakt.export import export_gguf
from kompakt.export.gguf_arch import GGUF_FAMILIES
from kompakt.model.tiny import TINY_FAMILIES, tiny_model

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")


def _llama(path, n_ctx: int = 512):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, n_threads=2)


def _scores(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("family", [family for family in TINY_FAMILIES if family in GGUF_FAMILIES])
def test_tiny_families_match_transformers_in_llama_cpp(family, tmp_path):
    loaded = tiny_model(family)
    loaded.name = "tiny"  # llama.cpp special-cases names containing "phi3" (expects Phi-3's vocabulary)
    ids = torch.randint(3, 261, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = _llama(export_gguf(loaded, tmp_path / "m.gguf", type="f32"), n_ctx=128)
    try:
        scores = _scores(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(scores - ref).max() < 5e-3
    assert (scores.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def smollm2():
    from kompakt.model.load import load

    return load("smollm2-135m", device="cpu")


# special=True: llama.cpp then parses special tokens in text as the HF tokenizer always does.
PROBE = "Hello world! Numbers 12345 and 3.14, émojis 🦙, code: def f(x): return x**2\n\n  spaces <|im_start|>user\nhi"


def _window(loaded, wikitext_test, n: int = 512) -> list[int]:
    text = wikitext_test.read_text(encoding="utf-8")[:20000]
    return loaded.tokenizer.encode(text, add_special_tokens=False)[:n]


@pytest.mark.slow
def test_smollm2_in_llama_cpp(smollm2, wikitext_test, tmp_path):
    """Tokenization identical; F32 agrees with transformers on every position; Q8_0 within
    what llama.cpp's Q8_0 kernels allow (they quantize activations to 8 bits too)."""
    from kompakt.model.load import load

    ids = _window(smollm2, wikitext_test)
    with torch.no_grad():
        ref = smollm2.model(torch.tensor([ids])).logits[0].numpy()
    for type, floor in (("f32", 0.998), ("q8_0", 0.94)):
        path = export_gguf(smollm2, tmp_path / f"s-{type}.gguf", type=type)
        llm = _llama(path)
        try:
            for text in (PROBE, wikitext_test.read_text(encoding="utf-8")[:2000]):
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == smollm2.tokenizer.encode(
                    text, add_special_tokens=False
                )
            scores = _scores(llm, ids)
        finally:
            llm.close()
        with torch.no_grad():
            own = load(path, device="cpu").model(torch.tensor([ids])).logits[0].numpy()
        assert (scores.argmax(-1) == own.argmax(-1)).mean() >= floor, type
        assert (scores.argmax(-1) == ref.argmax(-1)).mean() >= floor, type


@pytest.mark.slow
@pytest.mark.parametrize("type", ["q8_0", "q5_1", "q5_0", "q4_0"])
def test_same_tensors_as_llama_cpp_quantizer(smollm2, tmp_path, type):
    """kompakt's Q8_0 / Q5_1 / Q5_0 / Q4_0 equal llama_model_quantize on kompakt's F32 export,
    tensor for tensor."""
    source = export_gguf(smollm2, tmp_path / "f32.gguf", type="f32")
    ours = export_gguf(smollm2, tmp_path / f"ours-{type}.gguf", type=type)
    theirs = tmp_path / f"theirs-{type}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


@pytest.mark.slow
def test_gemma3_in_llama_cpp(wikitext_test, tmp_path):
    """Gemma 3 (SentencePiece-style vocabulary, sliding-window layers, shifted norms)."""
    from kompakt.model.load import load

    gemma = load("gemma3-270m", device="cpu")
    path = export_gguf(gemma, tmp_path / "g.gguf", type="f16")
    text = wikitext_test.read_text(encoding="utf-8")[:4000]
    ids = gemma.tokenizer.encode(text, add_special_tokens=True)[:256]
    llm = _llama(path)
    try:
        for probe in (PROBE, text[:1500]):
            assert llm.tokenize(probe.encode(), add_bos=True, special=True) == gemma.tokenizer.encode(probe)
        scores = _scores(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        ref = gemma.model(torch.tensor([ids])).logits[0].float().numpy()
    assert (scores.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_mixed_type_export_runs_in_llama_cpp_and_agrees(tmp_path, monkeypatch):
    """A quant step with per-tensor types (q4_0 default, q8_0 / q5_0 / q5_1 / q4_1 on some
    Linears, the embedding in q8_0): llama.cpp loads the file and the export check's top-1
    agreement with transformers passes."""
    from kompakt.export.api import export
    from kompakt.passes.base import PassContext, build_config, get_pass

    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    loaded = tiny_model("llama")
    loaded.name = "tiny"
    types = {"model.layers.*.mlp.down_proj": "q8_0", "model.layers.0.self_attn.v_proj": "q5_0",
             "model.layers.1.self_attn.q_proj": "q5_1", "model.layers.2.mlp.up_proj": "q4_1",
             "model.embed_tokens": "q8_0"}  # fmt: skip
    spec = get_pass("quant.rtn")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None)
    spec.apply(ctx, build_config(spec, {"format": "q4_0", "tensor_types": types}))
    result = export(loaded, format="gguf", type="q4_0", out=tmp_path / "mixed.gguf",
                    tensor_types=[r"blk\.3\.attn_output=q8_0"])  # fmt: skip
    assert result.check is not None and not result.check.failed
    kinds = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(result.path)).tensors}
    assert kinds["blk.0.attn_v.weight"] == "q5_0" and kinds["blk.3.attn_output.weight"] == "q8_0"
    assert kinds["blk.2.ffn_up.weight"] == "q4_1" and kinds["token_embd.weight"] == "q8_0"
