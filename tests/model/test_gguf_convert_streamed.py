"""A GGUF is converted tensor by tensor (kompakt.model.gguf_convert): the values, names and config
are what transformers' own `from_pretrained(gguf_file=...)` loads, family by family, and the
conversion holds one shard and one tensor, never the model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import kompakt.model.gguf_convert as gguf_convert
from kompakt.errors import OutputPathError
from kompakt.export import export_gguf
from kompakt.model.load import load
from kompakt.model.progress import quiet_third_party
from kompakt.model.shard_writer import ShardWriter
from kompakt.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
# Every family kompakt writes as GGUF: the dense ones transformers also reads whole, and the Qwen
# MoEs with the routing llama.cpp computes (their expert stacks are joined from two GGUF tensors
# per layer; transformers' reader leaves their expert widths at its defaults and cannot load them).
DENSE = ("llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text")
MOE = {"qwen2_moe": {"norm_topk_prob": False}, "qwen3_moe": {"norm_topk_prob": True}}
IGNORED_CONFIG = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config")  # theirs: how it was read


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))


def _stored(directory) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("family", DENSE)
def test_the_conversion_is_what_transformers_loads(family, tmp_path):
    source = tiny_model(family)
    source.name = "tiny"
    path = export_gguf(source, tmp_path / "m.gguf", type="q8_0")
    converted = gguf_convert.convert_gguf(path)
    with quiet_third_party():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = _stored(converted)
    expected = theirs.state_dict()
    tied = {name for name in expected if name not in ours and theirs.config.tie_word_embeddings and "lm_head" in name}
    assert set(ours) == set(expected) - tied
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    mine = {k: v for k, v in AutoConfig.from_pretrained(converted).to_dict().items() if k not in IGNORED_CONFIG}
    assert mine == {k: v for k, v in theirs.config.to_dict().items() if k not in IGNORED_CONFIG}
    ids = torch.tensor([[3, 70, 80, 90, 100, 110, 4]])
    with torch.no_grad():
        torch.testing.assert_close(load(path, device="cpu").model(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("family", [*DENSE, "qwen3", *MOE])
def test_an_f32_file_converts_back_to_its_source_exactly(family, tmp_path):
    """Layout conversions undone exactly (q/k rows, Gemma's norm shift, expert stacks, the Qwen3
    head_dim and the MoE expert widths transformers' reader misses): the source's own tensors."""
    source = tiny_model(family, **MOE.get(family, {}))
    source.name = "tiny"
    loaded = load(export_gguf(source, tmp_path / "m.gguf", type="f32"), device="cpu")
    theirs = source.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, theirs[name].reshape(tensor.shape)), name
    if family in MOE:
        assert loaded.model.config.norm_topk_prob == MOE[family]["norm_topk_prob"]


def test_head_dim_comes_from_the_file(tmp_path):
    """transformers reads a Qwen3 GGUF with head_dim 128 whatever the file says (and then refuses its
    tensors); kompakt takes the file's attention.key_length: the tiny Qwen3 (head_dim 16) loads and
    computes as its source does (q8_0: within its rounding)."""
    source = tiny_model("qwen3")
    source.name = "tiny"
    loaded = load(export_gguf(source, tmp_path / "m.gguf", type="q8_0"), device="cpu")
    assert loaded.model.config.head_dim == 16
    ids = torch.tensor([[3, 70, 80, 90, 100, 110, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, source.model(ids).logits, atol=0.05, rtol=0.05)


def test_the_conversion_holds_a_shard_and_a_tensor_never_the_model(tmp_path, monkeypatch):
    source = tiny_model("llama")
    source.name = "tiny"
    path = export_gguf(source, tmp_path / "m.gguf", type="q4_0")
    largest = max(p.numel() for p in source.model.parameters()) * 4
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", largest)
    held: list[int] = []
    add = ShardWriter.add

    def watched(self, name, tensor):
        add(self, name, tensor)
        held.append(self.pending_bytes)

    monkeypatch.setattr(ShardWriter, "add", watched)
    converted = gguf_convert.convert_gguf(path)
    model_bytes = sum(p.numel() for p in source.model.parameters()) * 4
    assert max(held) <= 2 * largest < model_bytes / 4
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 4
    with quiet_third_party():  # the many shards hold what transformers reads from the file, tensor by tensor
        expected = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    stored = _stored(converted)
    assert set(stored) <= set(expected) and len(stored) >= len(expected) - 1  # lm_head may be tied
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name]), name


def test_no_room_for_the_conversion_is_one_line_before_writing(tmp_path, monkeypatch):
    source = tiny_model("llama")
    source.name = "tiny"
    path = export_gguf(source, tmp_path / "m.gguf", type="q4_0")
    monkeypatch.setattr("shutil.disk_usage", lambda place: type("usage", (), {"free": 1000})())
    with pytest.raises(OutputPathError, match="no room for .*model.safetensors: it needs about"):
        gguf_convert.convert_gguf(path)
    assert not list((tmp_path / "cache" / "models" / "gguf").glob("m-*"))
