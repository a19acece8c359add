"""A quantized recipe step is stored packed (compressed-tensors) and everything reads it back:
the next step (dense weights), kompakt.load (same logits), GGUF export, and the refusal to
quantize twice."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import small_data
from safetensors import safe_open

from kompakt.errors import ConfigError
from kompakt.model.compression import get_state
from kompakt.model.load import load
from kompakt.model.quantized import is_quantized
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe
from kompakt.rundir.stepsave import save_step_model

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _gptq(loaded, **values):
    spec = get_pass("quant.gptq")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: calib, seed=0)
    return spec.apply(ctx, build_config(spec, {"bits": 4, "group_size": 32, **values}))


def _expected_bytes(loaded, packed) -> int:
    """4-bit codes + fp16 scales + int64 shape per packed Linear; the rest in fp16, tied once."""
    total, seen = 0, set()
    for name, tensor in loaded.model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in packed and name.endswith(".weight"):
            out_features, in_features = tensor.shape
            total += out_features * in_features // 2 + out_features * (in_features // 32) * 2 + 2 * 8
        elif tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    return total


def test_packed_step_is_small_and_reloads_with_the_same_logits(tmp_path):
    loaded = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():  # fp16-exact weights, so the fp16 copy of the rest is exact too
        for param in loaded.model.parameters():
            param.copy_(param.half().float())
    report = _gptq(loaded)
    packed = report.packed_layers
    assert packed and all(layer.scale.dtype == torch.float16 for layer in packed.values())
    before = _logits(loaded.model)
    details = save_step_model(loaded, tmp_path / "q", torch.float32, packed)
    assert details["stored_as"] == "compressed-tensors" and details["dense_dtype"] == "float16"
    stored = (tmp_path / "q" / "model.safetensors").stat().st_size
    expected = _expected_bytes(loaded, packed)
    assert expected <= stored <= expected * 1.05 + 16_384  # + the safetensors header
    fp16 = sum(p.numel() * 2 for p in loaded.model.parameters())
    assert stored < 0.6 * fp16
    back = load(tmp_path / "q", device="cpu")
    assert torch.equal(_logits(back.model), before)
    # A plain dense model: ordinary Linears with a float weight, no compressed-tensors leftovers.
    q_proj = back.model.model.layers[0].self_attn.q_proj
    assert [n for n, _ in q_proj.named_parameters()] == ["weight"] and "forward" not in q_proj.__dict__
    assert back.model.config.quantization_config["quant_method"] == "compressed-tensors"
    assert is_quantized(back)
    with open(tmp_path / "q" / "config.json") as f:
        groups = json.load(f)["quantization_config"]["config_groups"]
    assert {g["weights"]["group_size"] for g in groups.values()} == {32}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_dtype() == "F16"


def test_recipe_quant_step_then_dense_pass_export_and_refusal(tiny_dir, text_file, tmp_path):
    from kompakt.export.gguf import write_gguf

    steps = [{"quant.gptq": {"bits": 4, "group_size": 32, "max_blocks": 4}},
             {"prune.sparse": {"method": "magnitude", "sparsity": 0.25}}]  # fmt: skip
    recipe = Recipe.from_dict({"model": str(tiny_dir), "seed": 1, "data": small_data(text_file), "steps": steps})
    result = run_recipe(recipe, tmp_path / "run")
    quant, sparse = result.records
    # counts and a few names, not one entry per layer (28 here, 210 on SmolLM2)
    assert len((tmp_path / "run" / "lineage.jsonl").read_text().splitlines()[0]) < 2000
    step_dir = tmp_path / "run" / quant["dir"]
    assert quant["details"]["stored_as"] == "compressed-tensors" and quant["details"]["packed_layers"] == 28
    assert "quantization_config" in json.loads((step_dir / "config.json").read_text())
    dense_fp32 = sum(p.numel() * 4 for p in load(tiny_dir, device="cpu").model.parameters())
    assert quant["bytes"] < 0.4 * dense_fp32
    # The sparse step got dense weights and saved a plain directory (no packed-tensor config).
    assert "stored_as" not in sparse["details"]
    assert "quantization_config" not in json.loads((tmp_path / "run" / sparse["dir"] / "config.json").read_text())
    stored = load(step_dir, device="cpu")
    export = write_gguf(stored, tmp_path / "q.gguf", type="q8_0")
    assert export.path.is_file() and export.path.with_name("q.gguf.sha256").is_file()
    requant = Recipe.from_dict({"model": str(step_dir), "seed": 1, "data": small_data(text_file),
                                "steps": [{"quant.rtn": {"bits": 8}}]})  # fmt: skip
    with pytest.raises(ConfigError, match="already quantized") as error:
        run_recipe(requant, tmp_path / "again")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fmt, pass_name", [("q4_0", "quant.gptq"), ("q8_0", "quant.rtn")])
def test_gguf_grid_step_is_stored_packed_and_exports_the_same_blocks(fmt, pass_name, tmp_path):
    from gguf import GGUFReader

    from kompakt.export.gguf import write_gguf

    loaded = tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():
        for param in loaded.model.parameters():
            param.copy_(param.half().float())
    if pass_name == "quant.gptq":
        report = _gptq(loaded, format=fmt)
    else:
        spec = get_pass(pass_name)
        ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None, seed=0)
        report = spec.apply(ctx, build_config(spec, {"format": fmt}))
    packed = report.packed_layers
    assert packed and {layer.bits for layer in packed.values()} == {4 if fmt == "q4_0" else 8}
    before = _logits(loaded.model)
    details = save_step_model(loaded, tmp_path / "q", torch.float32, packed)
    assert details["stored_as"] == "compressed-tensors"
    dense_fp32 = sum(p.numel() * 4 for p in loaded.model.parameters())
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < (0.25 if fmt == "q4_0" else 0.4) * dense_fp32
    back = load(tmp_path / "q", device="cpu")
    assert torch.equal(_logits(back.model), before)  # codes x fp16 scale: the same values
    assert get_state(back).quantization.format == fmt
    files = [write_gguf(m, tmp_path / f"{tag}.gguf", type=fmt).path for tag, m in (("mem", loaded), ("disk", back))]
    tensors = [{t.name: bytes(t.data) for t in GGUFReader(path).tensors} for path in files]
    assert tensors[0] == tensors[1]  # the reloaded step exports exactly the blocks it was quantized to
