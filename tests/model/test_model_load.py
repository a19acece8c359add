"""load() on local Hugging Face directories: round trips, refusals and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import kompakt.model.dtype as dtype_module
from kompakt.errors import KompaktError, ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from kompakt.model.load import load, resolve_model_dir
from kompakt.model.tiny import TINY_FAMILIES, save_tiny

IDS = torch.tensor([[3, 70, 80, 90, 100, 110, 4]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def llama_dir(tmp_path):
    directory = tmp_path / "tiny-llama"
    original = save_tiny("llama", directory)
    return directory, original


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_directory_loads_with_equal_logits(tmp_path, family):
    directory = tmp_path / family
    original = save_tiny(family, directory)
    loaded = load(directory, device="cpu")
    assert loaded.path == directory and loaded.name == family
    assert loaded.storage_dtype == torch.float32 and loaded.compute_dtype == torch.float32
    assert not loaded.model.training
    torch.testing.assert_close(_logits(loaded.model), _logits(original.model))
    assert loaded.tokenizer("hi").input_ids == original.tokenizer("hi").input_ids
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template


def test_config_json_path_and_resolve(llama_dir):
    directory, _ = llama_dir
    assert load(directory / "config.json").path == directory
    assert resolve_model_dir(str(directory)) == directory


def test_bf16_checkpoint_records_storage_dtype(tmp_path, monkeypatch):
    directory = tmp_path / "bf16"
    original = save_tiny("llama", directory)
    original.model.to(torch.bfloat16).save_pretrained(directory)
    monkeypatch.setattr(dtype_module, "cpu_has_native_bf16", lambda: False)
    loaded = load(directory, device="cpu")
    assert loaded.storage_dtype == torch.bfloat16
    assert loaded.compute_dtype == torch.float32  # no native bf16: computed in fp32
    monkeypatch.setattr(dtype_module, "cpu_has_native_bf16", lambda: True)
    assert load(directory, device="cpu").compute_dtype == torch.bfloat16
    assert load(directory, device="cpu", dtype="fp32").compute_dtype == torch.float32


def test_sharded_checkpoint_loads_and_missing_shard_is_refused(tmp_path):
    directory = tmp_path / "sharded"
    original = save_tiny("qwen2", directory)
    for file in directory.glob("*.safetensors"):
        file.unlink()
    original.model.save_pretrained(directory, max_shard_size="20KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(load(directory).model), _logits(original.model))
    shards[1].unlink()
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    assert "shard" in _one_line(error)


def test_pickle_only_directory_is_refused_without_unpickling(llama_dir, monkeypatch):
    directory, original = llama_dir
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def never(*args, **kwargs):
        raise AssertionError("kompakt must never unpickle weights")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    message = _one_line(error)
    assert "pytorch_model.bin" in message and "safe_serialization=True" in message


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        load(tmp_path / "nowhere")
    assert "smollm2-135m" in _one_line(error)
    with pytest.raises(ModelNotFoundError):
        load("not a model name")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as error:
        load(tmp_path)
    assert "config.json" in _one_line(error)


def test_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelFormatError) as error:
        load(path)
    assert "is a file but not a .gguf; pass a .gguf file or a model directory" in _one_line(error)


@pytest.mark.parametrize("keep", [4, 100, 0.5, -8])
def test_truncated_safetensors(llama_dir, keep):
    directory, _ = llama_dir
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    weights.write_bytes(data[:cut])
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    assert "truncated or corrupt" in _one_line(error)


def test_garbage_safetensors_header(llama_dir):
    directory, _ = llama_dir
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header now starts with garbage
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    assert "truncated or corrupt (header is not valid JSON)" in _one_line(error)


def test_missing_weight_is_refused_not_randomly_initialised(llama_dir):
    directory, _ = llama_dir
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    assert "up_proj" in _one_line(error)


def test_bad_config_json(llama_dir):
    directory, _ = llama_dir
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(ModelFormatError) as error:
        load(directory)
    assert "config.json is not valid JSON" in _one_line(error) and "restore it from the original model" in str(error.value)


@pytest.mark.parametrize(
    ("model_type", "kwargs"),
    [
        ("t5", dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)),
        ("bart", dict(d_model=16, encoder_layers=1, decoder_layers=1, vocab_size=64)),
    ],
)
def test_encoder_decoder_is_refused_before_reading_weights(tmp_path, model_type, kwargs):
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage that must not be read")
    with pytest.raises(UnsupportedArchitectureError) as error:
        load(tmp_path)
    message = _one_line(error)
    assert model_type in message and "encoder-decoder" in message and "llama" in message


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as error:
        load("kompakt-tests/no-such-model-xyz")
    message = _one_line(error)
    assert "offline" in message and "local" in message


def test_directory_is_not_modified_by_loading(llama_dir):
    directory, _ = llama_dir
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    load(directory)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


def test_errors_are_kompakt_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(KompaktError) as error:
        load(tmp_path)  # no weights at all
    assert "has no *.safetensors weights; copy or download the model again" in _one_line(error)


def test_prefix_ids():
    from kompakt.model.tiny import tiny_tokenizer
    from kompakt.model.tokens import prefix_ids

    tokenizer = tiny_tokenizer()
    assert prefix_ids(tokenizer) == []  # the tiny byte tokenizer adds nothing
