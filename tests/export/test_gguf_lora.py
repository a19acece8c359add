"""`kompakt export --format gguf-lora`: llama.cpp (llama-cpp-python `lora_path`) applies the adapter
on kompakt's own base GGUF and computes what kompakt computes with it attached (q/k rows permuted
like the base); a base GGUF the adapter does not fit is refused in one line, nothing written."""

from __future__ import annotations

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
