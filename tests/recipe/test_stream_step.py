"""Streamed steps (a model larger than memory, one decoder layer at a time) equal in-memory steps.

Every streamable pass x every tiny decoder family: the same step applied to the loaded model and
saved as the runner saves it, and applied streamed (kompakt.recipe.stream_step) from the lazily
opened directory, must store the same tensors bit for bit (names, dtypes, values) and the same
config.json; while streaming, at most one decoder layer (or the embedding) is materialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe_helpers import stored_tensors

import kompakt
from kompakt.errors import ConfigError
from kompakt.model.lazy import open_lazy
from kompakt.model.load import load
from kompakt.model.progress import quiet_third_party
from kompakt.model.tiny import TINY_FAMILIES, save_tiny, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.recipe.stream_step import in_memory_bytes, must_stream, refuse_unstreamable, streamed_step
from kompakt.units import parse_memory
from kompakt.rundir.stepsave import save_step_model

STREAMED = {
    "rtn": ("quant.rtn", {"bits": 4, "group_size": 32}),
    "gptq": ("quant.gptq", {"bits": 4, "group_size": 32}),
    "awq": ("quant.awq", {"bits": 4, "group_size": 32}),
    "wanda": ("prune.sparse", {"method": "wanda", "sparsity": 0.5}),
    "sparsegpt": ("prune.sparse", {"method": "sparsegpt", "nm": "2:4"}),
}
TEST_CASES = [pytest.param(key, family, id=f"{key}-{family}") for key in STREAMED for family in TINY_FAMILIES]
# Single-family rows for the options that take other code paths.
EXTRA_CASES = [
    pytest.param("gemma", "quant.gptq", {"bits": 4, "group_size": 32, "embeddings": True, "lm_head": True}, id="gptq-tied-head"),
    pytest.param("llama", "quant.rtn", {"format": "q4_0", "lm_head": True}, id="rtn-q4_0-head"),
    pytest.param("llama", "quant.gptq", {"format": "q4_1"}, id="gptq-q4_1-dense"),
    pytest.param("qwen2", "quant.gptq", {"bits": 4, "group_size": 32, "awq": True}, id="gptq-awq"),
    pytest.param("mistral", "prune.sparse", {"method": "magnitude", "sparsity": 0.5, "owl": True}, id="magnitude-owl"),
]  # fmt: skip


def _blocks() -> torch.Tensor:
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _in_memory(source: Path, out: Path, name: str, values: dict) -> None:
    spec = get_pass(name)
    loaded = load(source, device="cpu", dtype="float32")
    input_dtype = loaded.storage_dtype
    blocks = _blocks()
    report = spec.apply(PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: blocks),
                        build_config(spec, values))  # fmt: skip
    save_step_model(report.loaded, out, input_dtype, report.packed_layers)


def _streamed(source: Path, out: Path, name: str, values: dict, shard_bytes: int = 40_000, spill_dir: Path | None = None):
    spec = get_pass(name)
    lazy = open_lazy(source, dtype="float32")  # as _in_memory loads it (a bf16 CPU would compute a bf16 input in bf16)
    blocks = _blocks()
    streamed_step(spec, build_config(spec, values), lazy, out,
                  lambda loaded, stream: PassContext(loaded=loaded, original=lambda: loaded,
                                                     calibration=lambda: blocks, stream=stream),
                  shard_bytes=shard_bytes, spill_dir=spill_dir)  # fmt: skip
    return lazy


def _check_equal(tmp_path: Path, family: str, name: str, values: dict, dtype: torch.dtype = torch.float32,
                 spill: bool = False):  # fmt: skip
    source = tmp_path / "in"
    loaded = tiny_model(family)
    with quiet_third_party():
        loaded.model.to(dtype).save_pretrained(source)
    loaded.tokenizer.save_pretrained(source)
    _in_memory(source, tmp_path / "memory", name, values)
    lazy = _streamed(source, tmp_path / "streamed", name, values, spill_dir=tmp_path / "spill" if spill else None)
    memory, streamed = stored_tensors(tmp_path / "memory"), stored_tensors(tmp_path / "streamed")
    assert sorted(memory) == sorted(streamed)
    for key, tensor in memory.items():
        assert tensor.dtype == streamed[key].dtype and torch.equal(tensor, streamed[key]), key
    blocks = tmp_path / "memory" / "gguf_blocks.safetensors"  # exact GGUF bytes (q4_1: not packable)
    if blocks.exists():
        assert blocks.read_bytes() == (tmp_path / "streamed" / "gguf_blocks.safetensors").read_bytes()
    config = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config == json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1  # sharded, with its index
    layer = lazy.layer_bytes(0, torch.float32) // 4
    assert 0 < lazy.peak_numel <= max(layer, lazy.tensors[f"{lazy.embed_path}.weight"].numel)
    assert lazy.live_numel == 0
    return lazy


@pytest.mark.parametrize("key,family", TEST_CASES)
def test_streamed_step_stores_the_in_memory_weights(tmp_path, one_thread, key, family):
    name, values = STREAMED[key]
    _check_equal(tmp_path, family, name, values)


@pytest.mark.parametrize("family,name,values", EXTRA_CASES)
def test_streamed_options_store_the_in_memory_weights(tmp_path, one_thread, family, name, values):
    _check_equal(tmp_path, family, name, values)


@pytest.mark.parametrize("family,name,values", [
    pytest.param("llama", "quant.gptq", {"bits": 4, "group_size": 32, "awq": True, "batch_size": 2}, id="gptq-awq"),
    pytest.param("gemma3", "prune.sparse", {"method": "sparsegpt", "sparsity": 0.5, "batch_size": 3}, id="sparsegpt"),
])  # fmt: skip
def test_activations_spilled_to_disk_give_the_same_weights(tmp_path, one_thread, family, name, values):
    _check_equal(tmp_path, family, name, values, spill=True)
    assert len(list((tmp_path / "spill" / "a").glob("b*.safetensors"))) == 2  # 4 blocks in batches of 2 / 3


def test_bf16_input_streams_to_the_same_packed_directory_and_loads(tmp_path, one_thread):
    _check_equal(tmp_path, "llama", "quant.gptq", {"bits": 4, "group_size": 32}, dtype=torch.bfloat16)
    streamed, memory = kompakt.load(tmp_path / "streamed", device="cpu"), kompakt.load(tmp_path / "memory", device="cpu")
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(streamed.model(ids).logits, memory.model(ids).logits)
    from transformers import AutoModelForCausalLM

    with quiet_third_party():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # transformers alone reads it
    assert plain.config.quantization_config is not None


def test_failed_streamed_step_leaves_nothing(tmp_path):
    save_tiny("llama", tmp_path / "in")
    spec = get_pass("quant.gptq")

    def no_data():
        raise RuntimeError("calibration failed")

    with pytest.raises(RuntimeError, match="calibration failed"):
        streamed_step(spec, build_config(spec, {}), open_lazy(tmp_path / "in"), tmp_path / "out",
                      lambda loaded, stream: PassContext(loaded=loaded, original=lambda: loaded,
                                                         calibration=no_data, stream=stream))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_budget_switch_and_refusal(tmp_path):
    save_tiny("llama", tmp_path)
    lazy = open_lazy(tmp_path)
    need = in_memory_bytes(lazy, calibration_tokens=4 * 24)
    assert need > lazy.bytes_in(torch.float32) > 0
    assert must_stream(lazy, need - 1, 4 * 24) and not must_stream(lazy, need, 4 * 24)
    assert not must_stream(lazy, None)
    assert parse_memory("6GB") == 6 * 10**9 and parse_memory("1.5GiB") == 3 * 2**29 and parse_memory(None) is None
    with pytest.raises(ConfigError, match="size like 6GB"):
        parse_memory("six gigs")
    refuse_unstreamable(get_pass("quant.gptq"), lazy, 1000)  # streams: no error
    for name in ("distill.kd", "finetune.lora", "quant.qat", "prune.depth"):
        with pytest.raises(ConfigError, match="a larger --max-memory.*accelerate launch"):
            refuse_unstreamable(get_pass(name), lazy, 1000)


@pytest.mark.slow
def test_streamed_gptq_on_smollm2_equals_in_memory(tmp_path, one_thread):
    """The embedded SmolLM2-135M (30 layers, tied head, fp32): streamed GPTQ stores what the
    in-memory step stores, bit for bit, holding one layer at a time."""
    from kompakt.model.load import resolve_model_dir

    source = resolve_model_dir("smollm2-135m")
    # The attention Linears only: every layer still streams, the column loops take half the time.
    values = {"bits": 4, "group_size": 64, "batch_size": 4, "modules": ["attn"]}
    _in_memory(source, tmp_path / "memory", "quant.gptq", values)
    lazy = _streamed(source, tmp_path / "streamed", "quant.gptq", values, shard_bytes=64 * 2**20)
    memory, streamed = stored_tensors(tmp_path / "memory"), stored_tensors(tmp_path / "streamed")
    assert sorted(memory) == sorted(streamed)
    assert all(t.dtype == streamed[k].dtype and torch.equal(t, streamed[k]) for k, t in memory.items())
    assert lazy.peak_numel == lazy.tensors[f"{lazy.embed_path}.weight"].numel  # the embedding: larger than a layer
    assert lazy.layer_bytes(0, torch.float32) // 4 < lazy.peak_numel < lazy.parameter_count() // 4
