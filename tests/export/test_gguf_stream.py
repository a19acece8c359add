"""Streaming GGUF export (kompakt.export.gguf_stream): the same bytes as the in-memory export, one
tensor in memory at a time, and the bad inputs of a model directory as one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kompakt.errors import OutputPathError
from kompakt.export.gguf import write_gguf
from kompakt.export.gguf_arch import GGUF_FAMILIES
from kompakt.export.gguf_stream import open_streamable, write_gguf_streamed
from kompakt.model.compression import Quantization, update_state
from kompakt.model.load import load
from kompakt.model.progress import quiet_third_party
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_FAMILIES, save_tiny, tiny_model
from kompakt.ops.gguf_grid import dequantize_blocks, quantize_blocks

pytest.importorskip("gguf")
EXPORTABLE = tuple(family for family in TINY_FAMILIES if family in GGUF_FAMILIES)
# One type per family, so the families together cover floats, 32-blocks and the llama.cpp fallbacks.
TYPES = dict(zip(EXPORTABLE, ("q4_0", "f16", "q8_0", "bf16", "iq4_nl", "q4_1", "f32", "q5_0")))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))


def _both(directory, tmp_path, type: str, **options):
    """(in-memory export, streamed export, the lazy model) of the model in `directory`."""
    memory = write_gguf(load(directory, device="cpu", dtype="float32"), tmp_path / "memory.gguf", type=type,
                        **options)  # fmt: skip
    lazy = open_streamable(directory)
    assert lazy is not None
    streamed = write_gguf_streamed(lazy, tmp_path / "streamed.gguf", type=type, **options)
    return memory, streamed, lazy


def _largest_tensor(lazy) -> int:
    return max(entry.numel for entry in lazy.tensors.values())


@pytest.mark.parametrize("family", EXPORTABLE)
def test_streamed_file_is_the_in_memory_file(family, tmp_path):
    save_tiny(family, tmp_path / family)
    memory, streamed, lazy = _both(tmp_path / family, tmp_path, TYPES[family])
    assert streamed.path.read_bytes() == memory.path.read_bytes()
    assert streamed.tensor_types == memory.tensor_types and streamed.notes == memory.notes
    # One module at a time: never more than the largest tensor (+ its bias) was in memory.
    assert 0 < lazy.peak_numel <= _largest_tensor(lazy) + 64 and lazy.live_numel == 0


def test_sharded_directory_streams_the_same_bytes(tmp_path):
    loaded = tiny_model("llama")
    with quiet_third_party():
        loaded.model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    loaded.tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    memory, streamed, _ = _both(tmp_path / "sharded", tmp_path, "q8_0")
    assert streamed.path.read_bytes() == memory.path.read_bytes()


def test_recorded_grid_and_per_tensor_types_stream_exactly(tmp_path):
    """The quantized contract (weights on a q4_0 grid, a per-tensor type) is read from the
    skeleton's config: the blocks are recovered exactly, not re-rounded, in both paths."""
    loaded = tiny_model("mistral")
    gen = torch.Generator().manual_seed(1)
    names = []
    for name, module in loaded.model.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            _, d, _ = quantize_blocks(module.weight.data, "q4_0")
            codes = torch.randint(2, 15, module.weight.shape, generator=gen, dtype=torch.int32)
            module.weight.data = dequantize_blocks(codes, d.abs(), None, "q4_0")
            names.append(name)
    update_state(loaded, quantization=Quantization("test", "q4_0", 4, 32, True, tuple(names)),
                 per_tensor_types={"model.layers.0.mlp.up_proj": "q8_0"})  # fmt: skip
    save_model(loaded, tmp_path / "grid")
    memory, streamed, _ = _both(tmp_path / "grid", tmp_path, "q4_0")
    assert streamed.exact_grid_tensors == memory.exact_grid_tensors == len(names)
    assert streamed.requantized_blocks == memory.requantized_blocks == 0
    assert "q8_0" in streamed.types_summary
    assert streamed.path.read_bytes() == memory.path.read_bytes()


def test_cli_export_streams_and_checks_when_the_model_fits(tmp_path, cli, monkeypatch):
    save_tiny("qwen2", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["export", str(tmp_path / "tiny"), "--type", "q8_0", "--out", "a.gguf"])
    assert code == 0, err
    assert "check:" in out and (tmp_path / "a.gguf.sha256").is_file()
    memory = write_gguf(load(tmp_path / "tiny", device="cpu", dtype="float32"), tmp_path / "b.gguf", type="q8_0")
    assert (tmp_path / "a.gguf").read_bytes() == memory.path.read_bytes()


def test_cli_export_over_the_budget_skips_the_check_with_a_note(tmp_path, cli, monkeypatch):
    save_tiny("llama", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["export", str(tmp_path / "tiny"), "--type", "q4_0", "--out", "a.gguf",
                          "--max-memory", "100KB"])  # fmt: skip
    assert code == 0, err
    assert "not checked against the original" in out and "check:" not in out
    assert (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF" and not (tmp_path / "a.gguf.verify.json").exists()
    code, _, err = cli(["export", str(tmp_path / "tiny"), "--out", "c.gguf", "--max-memory", "lots"])
    assert code == 2 and "--max-memory 'lots'" in err and len(err.strip().splitlines()) == 1


def test_factorized_or_compressed_models_are_exported_in_memory(tmp_path):
    save_tiny("llama", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {}}
    shutil.copytree(tmp_path / "plain", tmp_path / "packed")
    (tmp_path / "packed" / "config.json").write_text(json.dumps(config))
    assert open_streamable(tmp_path / "packed") is None
    assert open_streamable(tmp_path / "plain") is not None


# -- bad input: one line naming the file, exit 2, nothing written ---------------------------------


def _sharded(tmp_path):
    loaded = tiny_model("llama")
    directory = tmp_path / "sharded"
    with quiet_third_party():
        loaded.model.save_pretrained(directory, max_shard_size="40KB")
    loaded.tokenizer.save_pretrained(directory)
    return directory


def _nothing_written(tmp_path) -> bool:
    return not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*.tmp"))


def test_a_shard_missing_from_the_index_is_one_line(tmp_path, cli, monkeypatch):
    """A shard on disk that the index does not list (a partial copy of the index): its weights
    would be random, so the export refuses before writing, naming the directory."""
    directory = _sharded(tmp_path)
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = sorted(set(data["weight_map"].values()))[1]
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard}
    index.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["export", str(directory), "--out", "x.gguf", "--no-verify"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(directory) in err and "lacks" in err and _nothing_written(tmp_path)


def test_a_shard_missing_from_disk_is_one_line(tmp_path, cli, monkeypatch):
    directory = _sharded(tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["export", str(directory), "--out", "x.gguf", "--no-verify"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "weight shards" in err and shard.name in err and _nothing_written(tmp_path)


def test_a_shard_truncated_mid_file_is_one_line(tmp_path, cli, monkeypatch):
    directory = _sharded(tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["export", str(directory), "--out", "x.gguf", "--no-verify"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "truncated or corrupt" in err and str(shard) in err and _nothing_written(tmp_path)


def test_a_gguf_whose_tensor_data_ends_early_is_one_line(tmp_path, cli, monkeypatch):
    source = write_gguf(tiny_model("llama"), tmp_path / "src.gguf", type="q8_0").path
    bad = tmp_path / "cut" / "cut.gguf"
    bad.parent.mkdir()
    bad.write_bytes(source.read_bytes()[:-100])
    monkeypatch.chdir(tmp_path / "cut")
    code, _, err = cli(["export", str(bad), "--type", "q4_0", "--out", "x.gguf", "--no-verify"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(bad) in err and "truncated or corrupt" in err
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["cut.gguf"]


def test_a_disk_without_room_is_refused_before_writing(tmp_path, cli, monkeypatch):
    import kompakt.atomic as atomic

    save_tiny("llama", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)

    class Usage:
        free = 10_000

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: Usage)
    code, _, err = cli(["export", str(tmp_path / "tiny"), "--type", "f16", "--out", "x.gguf", "--no-verify"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no room for" in err and "x.gguf" in err and "10.0 KB free" in err
    assert _nothing_written(tmp_path)


@pytest.mark.slow
def test_smollm2_streamed_file_is_the_in_memory_file(tmp_path):
    from kompakt.model.load import resolve_model

    directory, _ = resolve_model("smollm2-135m")
    memory, streamed, lazy = _both(directory, tmp_path, "q4_0")
    assert streamed.path.read_bytes() == memory.path.read_bytes()
    assert lazy.peak_numel <= _largest_tensor(lazy)
    with pytest.raises(OutputPathError):
        write_gguf_streamed(lazy, streamed.path, type="q4_0")  # exists, no force


@pytest.mark.parametrize("type", ["q4_0", "q8_0", "q6_k", "q4_k", "iq4_nl", "bf16", "q2_k"])
def test_quantizing_in_row_chunks_gives_the_bytes_of_one_call(type, monkeypatch):
    import numpy as np

    from kompakt.export import gguf_tensors
    from kompakt.ops import ggml_types

    w = np.random.default_rng(0).standard_normal((37, 512)).astype(np.float32)
    monkeypatch.setattr(gguf_tensors, "QUANT_CHUNK", 5 * 512)  # 8 chunks, the last one short
    assert np.array_equal(gguf_tensors.quantize_rows(w, type), ggml_types.quantize(w, type))


def test_carried_k_quant_bytes_stream_from_a_memory_map(tmp_path):
    """Exact K-quant bytes a quant step saved beside the weights (kompakt.model.gguf_blocks) are
    read from a memory map when their tensor is written, and give the in-memory export's bytes."""
    import numpy as np

    from kompakt.model.gguf_blocks import GgufBlocks, load_blocks, save_blocks
    from kompakt.ops import ggml_types

    loaded = tiny_model("llama", hidden_size=256, intermediate_size=512)
    module = "model.layers.1.mlp.gate_proj"
    linear = loaded.model.get_submodule(module)
    data = ggml_types.quantize(linear.weight.detach().numpy(), "q4_k")
    linear.weight.data = torch.from_numpy(ggml_types.dequantize(data, "q4_k", tuple(linear.weight.shape)).copy())
    update_state(loaded, per_tensor_types={module: "q4_k"})
    save_model(loaded, tmp_path / "kq")
    save_blocks({module: GgufBlocks("q4_k", data)}, tmp_path / "kq")
    mapped = load_blocks(tmp_path / "kq", mmap=True)[module].data
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, data)
    memory, streamed, _ = _both(tmp_path / "kq", tmp_path, "q4_0")
    assert streamed.exact_grid_tensors == memory.exact_grid_tensors == 1
    assert streamed.path.read_bytes() == memory.path.read_bytes()
