"""GGUF export of Mixture-of-Experts models: llama.cpp's expert layout, run by llama.cpp with the
same logits as transformers, and one-line refusals (exit 2, nothing written) for what its MoE
graphs compute differently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export import export_gguf
from kompakt.export.check import MIN_TOP1, check_export
from kompakt.model.tiny import TINY_MOE, save_tiny, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

# What llama.cpp's graphs hard-code, given to the tiny models (whose defaults exercise the other
# branch): Qwen2-MoE / OLMoE never renormalise top-k, Qwen3-MoE always; OLMoE has no GQA.
LLAMACPP_ROUTING = {
    "qwen2_moe": dict(norm_topk_prob=False),
    "qwen3_moe": dict(norm_topk_prob=True),
    "olmoe": dict(norm_topk_prob=False, num_key_value_heads=4),
}


def moe_for_llamacpp(family: str, seed: int = 0):
    """A tiny MoE of `family` whose routing llama.cpp computes, with experts that differ clearly
    (transformers' init gives near-zero experts, so a wrong expert layout would hardly show)."""
    loaded = tiny_model(family, seed=seed, **LLAMACPP_ROUTING.get(family, {}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    loaded.name = "tiny"
    return loaded


def _llamacpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.parametrize("family", TINY_MOE)
def test_moe_families_match_transformers_in_llama_cpp(family, tmp_path):
    loaded = moe_for_llamacpp(family)
    path = export_gguf(loaded, tmp_path / "m.gguf", type="f32")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    experts = tensors["blk.0.ffn_gate_exps.weight"]
    n_experts, width, hidden = 4, 32, loaded.model.config.hidden_size
    assert tuple(experts.shape) == (hidden, width, n_experts)  # GGUF lists dimensions innermost first
    assert tuple(tensors["blk.1.ffn_down_exps.weight"].shape) == (width, hidden, n_experts)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.expert_count"].contents() == n_experts
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    if family == "qwen2_moe":
        assert "blk.0.ffn_gate_inp_shexp.weight" in tensors and "blk.0.ffn_down_shexp.weight" in tensors
    ids = torch.randint(3, 261, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0].numpy()
    scores = _llamacpp_logits(path, ids)
    assert np.abs(scores - ref).max() < 5e-3
    assert (scores.argmax(-1) == ref.argmax(-1)).all()


def test_quantized_moe_passes_the_export_check(tmp_path):
    """3-D expert stacks are quantized row by row like llama.cpp's own quantizer; the export check
    (top-1 agreement, as for dense families) passes at q8_0 and q4_0."""
    loaded = moe_for_llamacpp("mixtral")
    for qtype in ("q8_0", "q4_0"):
        path = export_gguf(loaded, tmp_path / f"m-{qtype}.gguf", type=qtype)
        tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        assert tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == qtype.upper()
        check = check_export(loaded, path, format="gguf", type=qtype)
        assert check.passed and check.top1 >= MIN_TOP1[qtype]


@pytest.mark.parametrize(
    ("family", "overrides", "needle"),
    [
        ("qwen2_moe", dict(norm_topk_prob=True), "renormalises its top-k"),
        ("qwen3_moe", dict(norm_topk_prob=False), "does not renormalise"),
        ("olmoe", dict(norm_topk_prob=False), "KV heads"),
        ("qwen3_moe", dict(norm_topk_prob=True, mlp_only_layers=[0]), "dense-MLP layers"),
    ],
)
def test_moe_llama_cpp_would_compute_differently_is_refused(family, overrides, needle, tmp_path):
    loaded = tiny_model(family, **overrides)
    with pytest.raises(UnsupportedArchitectureError, match=needle) as error:
        export_gguf(loaded, tmp_path / "m.gguf", type="f16")
    assert "\n" not in str(error.value) and "--format hf" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_refused_moe_is_one_line_exit_2_in_the_cli(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny("qwen2_moe", tmp_path / "moe")  # the tiny default renormalises; llama.cpp's qwen2moe does not
    code, out, err = cli(["export", str(tmp_path / "moe"), "--type", "q8_0", "--out", "m.gguf"])
    assert code == 2 and "norm_topk_prob" in out + err
    assert not list(tmp_path.glob("m.gguf*"))

