"""GGUF export: round trips through kompakt.load, exact on-grid weights, types, pruned models, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError, OutputPathError, UnsupportedArchitectureError
from kompakt.export import export_gguf, verify_manifest, write_gguf
from kompakt.export.gguf_arch import GGUF_FAMILIES
from kompakt.export.gguf_tensors import _permute
from kompakt.model.compression import Quantization, update_state
from kompakt.model.tiny import TINY_FAMILIES, tiny_model
from kompakt.ops.gguf_grid import GGUFBlockGrid, dequantize_blocks, quantize_blocks

gguf = pytest.importorskip("gguf")
IDS = torch.randint(0, 261, (1, 24), generator=torch.Generator().manual_seed(0))
# transformers' GGUF loader reads these families (gemma: not at all; gemma2/3: only SentencePiece vocabularies).
LOADABLE = ("llama", "mistral", "qwen2", "phi3")
# llama.cpp runs these tiny families; the others (the multimodal Gemma 3 wrapper) are refused.
EXPORTABLE = tuple(family for family in TINY_FAMILIES if family in GGUF_FAMILIES)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(IDS).logits


def _load(path):
    from kompakt.model.load import load

    return load(path, device="cpu")


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", LOADABLE)
def test_f32_round_trip_gives_identical_logits(family, tmp_path):
    loaded = tiny_model(family)
    path = export_gguf(loaded, tmp_path / "m.gguf", type="f32")
    assert torch.equal(_logits(_load(path)), _logits(loaded))


def test_llama_f16_and_q8_0_round_trips_are_close(tmp_path):
    loaded = tiny_model("llama")
    ref = _logits(loaded)
    for type, tol in (("f16", 2e-3), ("q8_0", 3e-2)):
        back = _logits(_load(export_gguf(loaded, tmp_path / f"{type}.gguf", type=type)))
        assert (back - ref).abs().max() < tol, type
        assert (back.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("family", EXPORTABLE)
def test_every_family_writes_a_readable_file(family, tmp_path):
    loaded = tiny_model(family)
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q8_0")
    reader = gguf.GGUFReader(str(result.path))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.3.ffn_down.weight" in names
    assert bytes(reader.fields["general.quantized_by"].parts[-1]).decode() == "kompakt"
    assert verify_manifest(result.path) == []
    assert result.manifest.read_text().split()[1] == "m.gguf"


def test_tensor_types_follow_llama_cpp_quantizer(tmp_path):
    untied = _tensors(export_gguf(tiny_model("llama"), tmp_path / "l.gguf", type="q4_0"))
    assert untied["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # 64 % 256 != 0
    assert untied["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert untied["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    tied = _tensors(export_gguf(tiny_model("qwen2"), tmp_path / "q.gguf", type="q4_1"))
    assert "output.weight" not in tied
    assert tied["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # doubles as output
    assert tied["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tied["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1


def _put_on_q4_0_grid(loaded, seed: int = 0) -> list[str]:
    """What a quant pass with format q4_0 leaves: on-grid fp32 weights + the recorded quantization.

    Codes are drawn so that many blocks never use code 0 (the -8·d value), as after GPTQ:
    re-quantizing such blocks with llama.cpp's rule would change them.
    """
    gen = torch.Generator().manual_seed(seed)
    names = []
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            _, d, _ = quantize_blocks(module.weight.data, "q4_0")
            codes = torch.randint(2, 15, module.weight.shape, generator=gen, dtype=torch.int32)
            module.weight.data = dequantize_blocks(codes, d.abs(), None, "q4_0")
            names.append(name)
    _record_grid(loaded, "q4_0", names)
    return names


def _record_grid(loaded, fmt: str, names: list[str]) -> None:
    bits = 8 if fmt == "q8_0" else 4
    update_state(loaded, quantization=Quantization("test", fmt, bits, 32, True, tuple(names)))


def test_q4_0_grid_weights_are_written_without_re_rounding(tmp_path):
    loaded = tiny_model("llama")
    names = _put_on_q4_0_grid(loaded)
    weight = loaded.model.get_submodule(names[0]).weight.data.clone()  # layer 0 q_proj
    requantized = dequantize_blocks(*quantize_blocks(weight, "q4_0"), "q4_0")
    assert not torch.equal(requantized, weight)  # llama.cpp's own rounding would move weights

    result = write_gguf(loaded, tmp_path / "grid.gguf", type="q4_0")
    assert result.exact_grid_tensors == len(names) and result.requantized_blocks == 0
    tensor = _tensors(result.path)["blk.0.attn_q.weight"]
    stored = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    expected = _permute(weight, loaded.model.config.num_attention_heads).numpy()
    assert np.array_equal(stored, expected)

    back = _load(result.path)
    for name in names:
        assert torch.equal(back.model.get_submodule(name).weight, loaded.model.get_submodule(name).weight), name


def test_gptq_style_grid_from_block_grid_is_exact(tmp_path):
    """Weights encoded with GGUFBlockGrid (what quant.gptq uses) after a perturbation are recovered."""
    loaded = tiny_model("mistral")
    grid = GGUFBlockGrid("q8_0")
    names = []
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            blocks = []
            for start in range(0, w.shape[1], 32):
                params = grid.fit(w[:, start : start + 32])
                noisy = w[:, start : start + 32] * 0.9  # the block drifted after fit (GPTQ updates)
                blocks.append(grid.decode(grid.encode(noisy, params), params))
            module.weight.data = torch.cat(blocks, dim=1)
            names.append(name)
    _record_grid(loaded, "q8_0", names)
    result = write_gguf(loaded, tmp_path / "g.gguf", type="q8_0")
    assert result.requantized_blocks == 0
    back = _load(result.path)
    assert all(torch.equal(back.model.get_submodule(n).weight, loaded.model.get_submodule(n).weight) for n in names)


def test_pruned_model_exports_and_round_trips(tmp_path):
    from kompakt.model.surgery import drop_layers, shrink_heads, shrink_mlp

    loaded = tiny_model("llama")
    loaded, _ = drop_layers(loaded, [1])
    loaded, _ = shrink_heads(loaded, torch.tensor([1]))  # 2 q heads, 1 kv head, head_dim 16 != 64 / 2
    loaded, _ = shrink_mlp(loaded, torch.arange(80))  # 80 is not a multiple of 32
    assert torch.equal(_logits(_load(export_gguf(loaded, tmp_path / "p.gguf", type="f32"))), _logits(loaded))
    result = write_gguf(loaded, tmp_path / "p4.gguf", type="q4_0")
    assert _tensors(result.path)["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert any("ffn_down" in note and "F16" in note for note in result.notes)
    assert _tensors(result.path)["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


def test_gemma3_layer_pattern_is_written_per_layer(tmp_path):
    loaded = tiny_model("gemma3_text", num_hidden_layers=3,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
    reader = gguf.GGUFReader(str(export_gguf(loaded, tmp_path / "g.gguf", type="f16")))
    assert reader.fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False, True]
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 64
    norm = _tensors(tmp_path / "g.gguf")["blk.0.attn_norm.weight"]
    assert np.allclose(np.asarray(norm.data), 1.0 + loaded.model.model.layers[0].input_layernorm.weight.detach().numpy())


# ----------------------------------------------------------------------------- bad input


def test_unsupported_family_fails_before_writing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kompakt.model.loaded import LoadedModel
    from kompakt.model.tiny import tiny_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=272))
    loaded = LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="GGUF export does not support model type 'gpt2'"):
        export_gguf(loaded, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES) - set(EXPORTABLE)))
def test_tiny_family_without_gguf_support_fails_before_writing(family, tmp_path):
    with pytest.raises(UnsupportedArchitectureError) as error:
        export_gguf(tiny_model(family), tmp_path / "x.gguf")
    assert "\n" not in str(error.value)
    assert not any(p for p in tmp_path.iterdir() if p.name != "cache")


def test_inexpressible_structure_fails_before_writing(tmp_path):
    loaded = tiny_model("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 128})  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="rope scaling 'yarn'"):
        export_gguf(loaded, tmp_path / "x.gguf")
    assert not any(p for p in tmp_path.iterdir() if p.name != "cache")


def test_existing_file_needs_force(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="exists; pass --force"):
        export_gguf(tiny_model("llama"), target)
    assert target.read_bytes() == b"keep me"
    export_gguf(tiny_model("llama"), target, type="q8_0", force=True)
    assert target.read_bytes()[:4] == b"GGUF"


def test_unknown_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown GGUF type 'q7_0'"):
        export_gguf(tiny_model("llama"), tmp_path / "m.gguf", type="q7_0")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import kompakt.export.gguf as gguf_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_module, "tensor_data", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_model("llama"), out / "m.gguf")
    assert list(out.iterdir()) == []


def test_compressed_tensors_q4_0_grid_exports_exactly(tmp_path):
    """A quant pass that stored symmetric int4, group 32, fp16 scales needs nothing else."""
    from kompakt.model.compression import PackedLayer
    from kompakt.model.quantized import save_quantized
    from kompakt.ops.quant import QuantGrid

    loaded = tiny_model("llama")
    grid = QuantGrid(4, 32, symmetric=True, scale_dtype=torch.float16)
    packed = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            packed[name] = PackedLayer.from_grid(module.weight.data, grid)
            module.weight.data = packed[name].dequantize()
    save_quantized(loaded, tmp_path / "ct", packed)
    stored = _load(tmp_path / "ct")
    result = write_gguf(stored, tmp_path / "ct.gguf", type="q4_0")
    assert result.exact_grid_tensors == len(packed) and result.requantized_blocks == 0
    back = _load(result.path)
    for name in packed:
        assert torch.equal(back.model.get_submodule(name).weight, loaded.model.get_submodule(name).weight), name


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_round_trip_gives_identical_logits(family, tmp_path):
    # transformers' GGUF reader sets query_pre_attn_scalar to 256 whatever the file says (llama.cpp
    # uses head_dim), so the tiny model uses head_dim 256 to make both readings agree.
    loaded = tiny_model(family, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=2**-20)
    path = export_gguf(loaded, tmp_path / "g.gguf", type="f32")
    assert torch.allclose(_logits(_load(path)), _logits(loaded), atol=1e-5)


@pytest.mark.parametrize("type", ["f16", "q8_0", "q4_0"])
def test_plan_bytes_are_the_files_tensor_data(type, tmp_path):
    import gguf

    from kompakt.export.gguf import prepare_gguf

    loaded = tiny_model("llama")
    plan = prepare_gguf(loaded, type)[3]
    path = export_gguf(loaded, tmp_path / "m.gguf", type=type)
    assert plan.data_bytes() == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_bytes_a_gguf_needs(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _disk_full)
    with pytest.raises(OutputPathError, match=r"no space left writing .*m\.gguf: it needs [\d.]+ (bytes|KB|MB),"):
        export_gguf(tiny_model("llama"), tmp_path / "m.gguf", type="f16")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_bytes_an_ollama_copy_needs(tmp_path, monkeypatch):
    import kompakt.export.ollama as ollama_module

    source = export_gguf(tiny_model("llama"), tmp_path / "m.gguf", type="q8_0")
    monkeypatch.setattr(ollama_module.shutil, "copyfile", _disk_full)
    size = source.stat().st_size
    need = f"{size / 1e3:.1f} KB" if size < 1e6 else f"{size / 1e6:.1f} MB"
    with pytest.raises(OutputPathError, match=f"it needs {need}"):
        ollama_module.export_ollama(source, tmp_path / "ollama")
    assert not (tmp_path / "ollama" / "model.gguf").exists()
