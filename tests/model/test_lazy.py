"""kompakt.model.lazy: a directory opened without its weights, materialised part by part."""

from __future__ import annotations

import json

import pytest
import torch

from kompakt.errors import ModelFormatError
from kompakt.model.lazy import lazy_of, open_lazy
from kompakt.model.progress import quiet_third_party
from kompakt.model.tiny import TINY_FAMILIES, save_tiny, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lazy_materialised_model_equals_loaded(tmp_path, family):
    original = save_tiny(family, tmp_path)
    lazy = open_lazy(tmp_path)
    assert lazy.live_numel == 0 and all(p.is_meta for p in lazy.model.parameters())
    assert lazy.parameter_count() == sum(p.numel() for p in original.model.parameters())
    lazy.materialize("", torch.float32)
    expected, got = original.model.state_dict(), lazy.model.state_dict()
    assert sorted(expected) == sorted(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(original.model(ids).logits, lazy.model(ids).logits)
    lazy.release("")
    assert lazy.live_numel == 0 and all(p.is_meta for p in lazy.model.parameters())
    assert lazy_of(lazy.model) is lazy and lazy_of(original.model) is None


def test_sharded_directory_opens_lazily_and_reads_one_layer(tmp_path):
    original = tiny_model("qwen2")  # tied head
    with quiet_third_party():
        original.model.save_pretrained(tmp_path, max_shard_size="40KB")
    original.tokenizer.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    lazy = open_lazy(tmp_path)
    assert len({entry.file for entry in lazy.tensors.values()}) == len(shards)
    layer = lazy.materialize(lazy.layer_path(2), torch.float32)
    assert lazy.live_numel == sum(p.numel() for p in layer.parameters())
    assert lazy.live_numel == lazy.layer_bytes(2, torch.float32) // 4
    expected = original.model.model.layers[2].state_dict()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in expected.items())
    lazy.release(layer)
    assert lazy.live_numel == 0 and lazy.peak_numel == sum(p.numel() for p in layer.parameters())


def test_tied_head_shares_the_embedding_while_both_live(tmp_path):
    save_tiny("gemma", tmp_path)
    lazy = open_lazy(tmp_path)
    assert lazy.tied
    embed = lazy.materialize(lazy.embed_path, torch.float32)
    head = lazy.materialize(lazy.lm_head_path, torch.float32)
    assert head.weight is embed.weight and lazy.live_numel == embed.weight.numel()
    lazy.release(lazy.lm_head_path)
    assert lazy.live_numel == embed.weight.numel() and not embed.weight.is_meta
    lazy.release(lazy.embed_path)
    assert lazy.live_numel == 0


def test_missing_shard_and_missing_tensor_are_one_line_errors(tmp_path):
    original = tiny_model("llama")
    with quiet_third_party():
        original.model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[1]
    (tmp_path / victim).rename(tmp_path / "moved.bin")
    with pytest.raises(ModelFormatError, match="misses 1 of"):
        open_lazy(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / victim)
    data["weight_map"]["model.layers.9.extra.weight"] = victim
    index.write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="no shard holds"):
        open_lazy(tmp_path)


@pytest.mark.parametrize("family,symmetric", [("llama", True), ("llama", False), ("gemma3", True)])
def test_packed_quantized_directory_opens_lazily_with_load_values(tmp_path, family, symmetric):
    """A compressed-tensors step (packed int4, or int8 codes with zero points) reads back
    dequantized exactly as kompakt.load densifies it."""
    from kompakt.model.load import load
    from kompakt.passes.base import PassContext, build_config, get_pass
    from kompakt.rundir.stepsave import save_step_model

    loaded = tiny_model(family)
    spec = get_pass("quant.rtn")
    report = spec.apply(PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None),
                        build_config(spec, {"bits": 4, "group_size": 32, "symmetric": symmetric}))  # fmt: skip
    save_step_model(report.loaded, tmp_path, torch.float32, report.packed_layers)
    lazy = open_lazy(tmp_path)
    assert lazy.stored_bytes() < lazy.bytes_in(torch.float16)  # 4-bit weights counted as such
    lazy.materialize("", torch.float32)
    expected, got = load(tmp_path, device="cpu", dtype="float32").model.state_dict(), lazy.model.state_dict()
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("native", [False, True])
def test_lazy_computes_in_the_dtype_the_in_memory_load_chooses(tmp_path, monkeypatch, native):
    """A bf16 checkpoint streams in bf16 on a CPU with native bf16 (as kompakt.load computes it and
    as llm-compressor computes it: the forward ~4x faster there), in fp32 elsewhere; dtype= pins it."""
    from kompakt.model import dtype as dtype_module
    from kompakt.model.device import use_device
    from kompakt.model.load import load

    directory = tmp_path / "bf16"
    save_tiny("llama", directory).model.to(torch.bfloat16).save_pretrained(directory)
    monkeypatch.setattr(dtype_module, "cpu_has_native_bf16", lambda: native)
    with use_device("cpu"):
        lazy = open_lazy(directory)
        assert lazy.compute_dtype == load(directory, device="cpu").compute_dtype
        assert lazy.compute_dtype == (torch.bfloat16 if native else torch.float32)
        assert open_lazy(directory, dtype="float32").compute_dtype == torch.float32
        save_tiny("llama", tmp_path / "fp32")
        assert open_lazy(tmp_path / "fp32").compute_dtype == torch.float32  # an fp32 checkpoint stays fp32
