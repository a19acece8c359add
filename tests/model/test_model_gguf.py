"""GGUF files: converted once into the cache, exact for F32 tensors, corrupt files refused."""

from __future__ import annotations

import os

import gguf
import pytest
import torch

import kompakt.model.gguf_convert as gguf_convert
from kompakt.errors import ModelFormatError, ModelNotFoundError, UnsupportedArchitectureError
from kompakt.model.cache import cache_dir
from kompakt.model.gguf_convert import SOURCE_RECORD, converted_dir_for, inspect_gguf
from kompakt.model.load import load, resolve_model_dir
from kompakt.model.tiny import CHATML_TEMPLATE

IDS = torch.tensor([[3, 70, 80, 90, 100, 110, 4]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KOMPAKT_CACHE", str(root))
    return root


def _copy(source, tmp_path, name="copy.gguf", edit=None):
    data = bytearray(source.read_bytes())
    if edit is not None:
        data = edit(data)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def _cache_entries(root) -> list[str]:
    folder = root / "models" / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_conversion_is_exact_and_keeps_tokenizer_and_template(cache, tiny_gguf, tmp_path):
    path, original = tiny_gguf
    loaded = load(path, device="cpu")
    assert loaded.name == "tiny" and loaded.path.parent == cache / "models" / "gguf"
    assert loaded.storage_dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits, original.model(IDS).logits)
    assert loaded.tokenizer.chat_template == CHATML_TEMPLATE
    assert loaded.tokenizer.decode(loaded.tokenizer("hello world").input_ids) == "hello world"
    assert not hasattr(loaded.model.config, "quantization_config")
    assert (loaded.path / SOURCE_RECORD).is_file() and (loaded.path / "model.safetensors").is_file()


def test_cached_conversion_is_reused(cache, tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    first = resolve_model_dir(path)

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_convert, "_convert_into", no_second_conversion)
    assert resolve_model_dir(path) == first
    assert load(path).path == first
    assert _cache_entries(cache) == [first.name]


def test_kompakt_cache_is_respected(tmp_path, tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    for name in ("one", "two"):
        monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / name))
        assert cache_dir() == tmp_path / name
        assert resolve_model_dir(path).is_relative_to(tmp_path / name)


def test_changed_file_converts_again(cache, tiny_gguf, tmp_path, write_tiny_gguf):
    path = _copy(tiny_gguf[0], tmp_path)
    first = resolve_model_dir(path)
    write_tiny_gguf(path, seed=1)  # same name, new content: a new key
    assert resolve_model_dir(path) != first


def test_directory_holding_one_gguf(cache, tiny_gguf, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _copy(tiny_gguf[0], folder, "model.gguf")
    assert load(folder).name == "model"


def test_inspect_reports_architecture(tiny_gguf):
    info = inspect_gguf(tiny_gguf[0])
    assert (info.architecture, info.model_type, info.has_chat_template) == ("llama", "llama", True)


def _flip(offset: int, bit: int):
    def edit(data: bytearray) -> bytearray:
        data[offset] ^= 1 << bit
        return data

    return edit


def _data_offset(path) -> int:
    return gguf.GGUFReader(str(path)).data_offset


def _nan_in_first_tensor(data: bytearray, data_offset: int) -> bytearray:
    # F32 little-endian: bit 30 is the top exponent bit; setting it on a small value gives inf/huge.
    data[data_offset + 3] |= 0x7F
    data[data_offset + 2] |= 0x80
    return data


@pytest.mark.parametrize(
    ("case", "edit"),
    [
        ("magic", _flip(0, 0)),
        ("version", _flip(4, 6)),
        ("tensor count", _flip(8, 6)),
        ("kv type", _flip(24, 6)),
        ("truncated in the header", lambda data: data[:1000]),
        ("truncated in the data", lambda data: data[:-10]),
        ("garbage", lambda data: bytearray(os.urandom(4096))),
        ("empty", lambda data: bytearray()),
    ],
)
def test_corrupt_gguf_is_a_one_line_format_error(cache, tiny_gguf, tmp_path, case, edit):
    path = _copy(tiny_gguf[0], tmp_path, edit=edit)
    with pytest.raises(ModelFormatError) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message and "corrupt" in message, case
    assert _cache_entries(cache) == []  # nothing half-written left behind


def test_non_finite_weights_are_refused(cache, tiny_gguf, tmp_path):
    offset = _data_offset(tiny_gguf[0])
    path = _copy(tiny_gguf[0], tmp_path, edit=lambda data: _nan_in_first_tensor(data, offset))
    with pytest.raises(ModelFormatError) as error:
        load(path)
    assert "non-finite" in str(error.value)
    assert _cache_entries(cache) == []


def test_missing_gguf(cache, tmp_path):
    with pytest.raises(ModelNotFoundError):
        load(tmp_path / "absent.gguf")


def test_unsupported_gguf_architecture(cache, tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError) as error:
        load(path)
    assert "bert" in str(error.value) and "llama" in str(error.value)


def test_converted_dir_key_depends_on_the_file(cache, tiny_gguf, tmp_path):
    a = _copy(tiny_gguf[0], tmp_path, "a.gguf")
    b = _copy(tiny_gguf[0], tmp_path, "b.gguf")
    assert converted_dir_for(a) != converted_dir_for(b)
    assert converted_dir_for(a) == converted_dir_for(a)
