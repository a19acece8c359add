"""`kompakt export --format gguf-lora`: llama.cpp (llama-cpp-python `lora_path`) applies the adapter
on kompakt's own base GGUF and computes what kompakt computes with it attached (q/k rows permuted
like the base); a base GGUF the adapter does not fit is refused in one line, nothing written."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kompakt.export import export_gguf
from kompakt.export.api import export
from kompakt.model.compression import Adapter, update_state
from kompakt.model.lora_adapter import ADAPTER_DIR, attach, without_adapter
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

IDS = torch.randint(3, 261, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def _with_adapter(family: str, rank: int = 4):
    """A tiny model with a large random adapter on every decoder Linear (ranks differ per Linear,
    so alpha / r scaling and the q / k row permutation would both show if wrong)."""
    loaded = tiny_model(family)
    loaded.name = "tiny"  # llama.cpp special-cases names containing "phi3"
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for i, (name, module) in enumerate((n, m) for n, m in loaded.model.named_modules()
                                       if isinstance(m, torch.nn.Linear) and ".layers." in n):  # fmt: skip
        r = rank + i % 3
        factors[name] = (torch.randn(module.out_features, r, generator=gen) * 0.1,
                         torch.randn(r, module.in_features, generator=gen) * 0.1)  # fmt: skip
    attach(loaded.model, factors)
    update_state(loaded, adapter=Adapter(ADAPTER_DIR, "test"))
    return loaded


def _scores(base, lora=None) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(base), logits_all=True, n_ctx=128, verbose=False, n_threads=1, **kwargs)
    try:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)])
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_llama_cpp_applies_the_adapter_as_kompakt_does(family, tmp_path):
    loaded = _with_adapter(family)
    with torch.no_grad():
        expected = loaded.model(torch.tensor([IDS])).logits[0].numpy()
        with without_adapter(loaded.model):
            plain = loaded.model(torch.tensor([IDS])).logits[0].numpy()
    base = export_gguf(loaded, tmp_path / "base.gguf", type="f32")
    result = export(loaded, format="gguf-lora", type="f32", out=tmp_path / "lora.gguf", base=base)
    assert result.path.exists() and result.manifest.exists()
    scores = _scores(base, result.path)
    assert np.abs(expected - plain).max() > 0.1  # the adapter matters ...
    assert np.abs(scores - expected).max() < 5e-3  # ... and llama.cpp applies exactly it
    assert (scores.argmax(-1) == expected.argmax(-1)).all()


def test_q8_0_adapter_is_smaller_and_applies_as_kompakt_does(tmp_path):
    """--type q8_0: lora_a in llama.cpp's 8-bit blocks, lora_b (rows r long) in f16; llama.cpp
    runs it with only q8_0's rounding of A between it and kompakt's forward."""
    import gguf

    loaded = _with_adapter("llama")
    with torch.no_grad():
        expected = loaded.model(torch.tensor([IDS])).logits[0].numpy()
        with without_adapter(loaded.model):
            plain = loaded.model(torch.tensor([IDS])).logits[0].numpy()
    base = export_gguf(loaded, tmp_path / "base.gguf", type="f32")
    sizes = {t: export(loaded, format="gguf-lora", type=t, out=tmp_path / f"{t}.gguf", base=base).size_bytes
             for t in ("f16", "q8_0")}  # fmt: skip
    types = {(t.name.rsplit(".", 1)[-1], t.tensor_type) for t in gguf.GGUFReader(str(tmp_path / "q8_0.gguf")).tensors}
    assert types == {("lora_a", gguf.GGMLQuantizationType.Q8_0), ("lora_b", gguf.GGMLQuantizationType.F16)}
    assert sizes["q8_0"] < 0.85 * sizes["f16"], sizes
    scores = _scores(base, tmp_path / "q8_0.gguf")
    # measured: 0.02 against the adapter's own effect of 0.69 on these logits
    assert np.abs(scores - expected).max() < 0.1 * np.abs(expected - plain).max()


def test_bad_base_is_refused_in_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = _with_adapter("llama")
    save_model(loaded, tmp_path / "step")
    shallow = tiny_model("llama")
    del shallow.model.model.layers[-1]
    shallow.model.config.num_hidden_layers -= 1
    other_layers = export_gguf(shallow, tmp_path / "shallow.gguf", type="f32")
    other_arch = export_gguf(tiny_model("qwen2"), tmp_path / "qwen.gguf", type="f32")
    for base, said in ((other_layers, "has no tensor blk.3"), (other_arch, "is a qwen2 model")):
        code, out, err = cli(["export", str(tmp_path / "step"), "--format", "gguf-lora", "--out", "a.gguf",
                              "--base", str(base)])  # fmt: skip
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (code, out, err)
        assert not (tmp_path / "a.gguf").exists()
    code, _, err = cli(["export", str(tmp_path / "step"), "--format", "gguf", "--base", str(other_arch)])
    assert code == 2 and "--format gguf-lora" in err
    save_model(tiny_model("llama"), tmp_path / "plain")
    code, _, err = cli(["export", str(tmp_path / "plain"), "--format", "gguf-lora", "--out", "a.gguf"])
    assert code == 2 and "no LoRA adapter" in err and not (tmp_path / "a.gguf").exists()


def _agreement(llm, model, window) -> tuple[float, float]:
    """Top-1 agreement and mean KL(llama.cpp || kompakt) over the rows of `window`."""
    import torch.nn.functional as F

    agree, kl, n = 0, 0.0, 0
    for row in window:
        llm.reset()
        llm.eval(row.tolist())
        theirs = torch.from_numpy(np.array(llm.scores[:512], dtype=np.float32))
        with torch.no_grad():
            ours = model.model(row[None]).logits[0].float()
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        kl += float(F.kl_div(F.log_softmax(theirs, -1), F.log_softmax(ours, -1), log_target=True, reduction="sum"))
        n += row.numel()
    return agree / n, kl / n


def _llama(path, **extra):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, verbose=False, n_threads=1, **extra)


@pytest.mark.slow
def test_smollm2_compensated_q4_0_agrees_in_llama_cpp(wikitext_test, tmp_path):
    """The issue's check on the real model: q4_0 + a rank-16 EoRA adapter, exported as kompakt's
    q4_0 base GGUF + the adapter GGUF; llama.cpp agrees with kompakt's own forward of base + adapter
    (mean KL <= 0.01) as closely as it agrees on the base alone. The base is RTN: the adapter and
    the export see a q4_0 grid either way, and GPTQ would double the test's time (the bench runs
    GPTQ; 114 s -> 76 s here). Measured: 96.8 % top-1 with the adapter (KL 0.0036), and the base
    GGUF alone agrees 96.0 % with kompakt's forward of the same q4_0 weights (KL 0.0037; on GPTQ
    96.6 % / 96.2 %): the gap to the issue's 97 % is llama.cpp's own (it rounds activations to 8
    bits in its q4_0 products), not the adapter's."""
    from kompakt.model.load import load
    from kompakt.passes.base import PassContext, build_config, get_pass

    original = load("smollm2-135m", device="cpu", dtype="float32")
    ids = original.tokenizer.encode(wikitext_test.read_text(encoding="utf-8")[:60000], add_special_tokens=False)
    calib = torch.tensor(ids[2048: 2048 + 4 * 512]).reshape(4, 512)
    window = torch.tensor(ids[:1024]).reshape(2, 512)
    models = [load("smollm2-135m", device="cpu", dtype="float32")]
    for name, values in (("quant.rtn", {"format": "q4_0"}), ("lowrank.compensate", {"rank": 16})):
        spec = get_pass(name)
        ctx = PassContext(loaded=copy.deepcopy(models[-1]), original=lambda: original, calibration=lambda: calib,
                          seed=0, teacher=lambda path: original)  # fmt: skip
        models.append(spec.apply(ctx, build_config(spec, values)).loaded)
    _, quantized, compensated = models
    base = export(compensated, format="gguf", type="q4_0", out=tmp_path / "base.gguf", verify=False).path
    lora = export(compensated, format="gguf-lora", out=tmp_path / "lora.gguf", base=base).path
    llm = _llama(base)
    try:
        base_top1, base_kl = _agreement(llm, quantized, window)
    finally:
        llm.close()
    llm = _llama(base, lora_path=str(lora))
    try:
        top1, kl = _agreement(llm, compensated, window)
    finally:
        llm.close()
    print(f"base: top-1 {base_top1:.4f} KL {base_kl:.5f}; with the adapter: top-1 {top1:.4f} KL {kl:.5f}")
    assert kl <= 0.01 and top1 >= 0.95 and top1 >= base_top1 - 0.01, (top1, kl, base_top1, base_kl)
