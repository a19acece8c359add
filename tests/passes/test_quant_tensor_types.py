"""Per-tensor GGUF types from a recipe to the file: quant steps with `tensor_types` put each Linear
on its own type's grid, record the types (and the exact bytes of grids the exporter cannot
recover) and the GGUF export writes them exactly; bad keys fail before any weight moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.export import write_gguf
from kompakt.export.gguf_tensors import _permute
from kompakt.model.compression import clear_quantization, get_state
from kompakt.model.gguf_blocks import BLOCKS_FILE
from kompakt.model.load import load
from kompakt.model.tiny import tiny_model
from kompakt.ops import ggml_types
from kompakt.passes.base import PassContext, build_config, get_pass

gguf = pytest.importorskip("gguf")
DOWN = "model.layers.{}.mlp.down_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
MIXED = {"model.layers.*.mlp.down_proj": "q8_0", V0: "q5_0", Q1: "q5_1", "model.embed_tokens": "q8_0"}


def _run(name: str, loaded, **values):
    spec = get_pass(name)
    blocks = torch.randint(3, 261, (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: blocks)
    return spec.apply(ctx, build_config(spec, values))


def _weights(loaded) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}


def _file_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_rtn_puts_each_linear_on_its_own_type_and_records_it():
    loaded = tiny_model("llama")
    before = _weights(loaded)
    report = _run("quant.rtn", loaded, format="q4_0", tensor_types=MIXED)
    state = get_state(loaded)
    types = state.per_tensor_types
    assert types[DOWN.format(2)] == "q8_0" and types[V0] == "q5_0" and types[Q1] == "q5_1"
    assert types["model.layers.3.self_attn.o_proj"] == "q4_0" and types["model.embed_tokens"] == "q8_0"
    assert state.types_source == {"source": "recipe"}
    for name, ttype in ((DOWN.format(1), "q8_0"), (V0, "q5_0"), (Q1, "q5_1"), ("model.layers.1.mlp.up_proj", "q4_0")):
        expected = ggml_types.fake_quantize(before[name].numpy(), ttype)
        assert np.array_equal(loaded.model.get_submodule(name).weight.detach().numpy(), expected), name
    # q5_0 / q5_1 cannot be recovered from dense weights (no 32-block recovery yet): their bytes travel
    assert set(loaded.gguf_blocks) == {V0, Q1}
    assert loaded.gguf_blocks[V0].type == "q5_0"
    # q4_0 / q8_0 store packed as before, the others stay dense
    assert DOWN.format(0) in report.packed_layers and V0 not in report.packed_layers
    # the embedding named in tensor_types is rounded to its type here too: the step measures the file
    assert report.details["grids"] == {"q8_0": 5, "q4_0": 22, "q5_0": 1, "q5_1": 1}
    embed = loaded.model.get_submodule("model.embed_tokens").weight.detach().numpy()
    assert np.array_equal(ggml_types.fake_quantize(embed, "q8_0"), embed)
    assert not torch.equal(loaded.model.model.embed_tokens.weight, tiny_model("llama").model.model.embed_tokens.weight)


def test_gguf_export_writes_the_recorded_types_exactly(tmp_path):
    loaded = tiny_model("llama")
    _run("quant.rtn", loaded, format="q4_0", tensor_types=MIXED)
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q4_0")
    tensors = _file_tensors(result.path)
    kinds = {name: t.tensor_type.name.lower() for name, t in tensors.items()}
    assert kinds["blk.0.ffn_down.weight"] == "q8_0" and kinds["blk.0.attn_v.weight"] == "q5_0"
    assert kinds["blk.1.attn_q.weight"] == "q5_1" and kinds["blk.1.attn_k.weight"] == "q4_0"
    assert kinds["token_embd.weight"] == "q8_0" and kinds["output.weight"] == "q8_0"  # 64 % 256: llama.cpp's Q8_0
    assert result.requantized_blocks == 0 and result.exact_grid_tensors == 29  # 28 Linears + the embedding
    heads = loaded.model.config.num_attention_heads
    q = _permute(loaded.model.get_submodule(Q1).weight.detach(), heads).numpy()  # q5_1 bytes, rows permuted
    stored = tensors["blk.1.attn_q.weight"]
    assert np.array_equal(gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type), q)
    reader = gguf.GGUFReader(str(result.path))
    assert reader.fields["kompakt.tensor_types.source"].contents() == "recipe"
    assert "kompakt.tensor_types" not in reader.fields  # the tensor infos hold the types
    summary = result.types_summary
    assert summary.startswith("q4_0: 22 tensors; q8_0: token_embd, output, blk.0-3.ffn_down") and "q5_1: blk.1.attn_q" in summary
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)  # most weights


def test_overrides_beat_the_models_types_which_beat_the_default(tmp_path):
    loaded = tiny_model("llama")
    _run("quant.rtn", loaded, format="q4_0", tensor_types={"model.layers.*.mlp.down_proj": "q8_0"})
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q4_1", tensor_types=[r"blk\.3\.ffn_down=f16"])
    kinds = {name: t.tensor_type.name.lower() for name, t in _file_tensors(result.path).items()}
    assert kinds["blk.3.ffn_down.weight"] == "f16" and kinds["blk.2.ffn_down.weight"] == "q8_0"
    assert kinds["blk.2.ffn_up.weight"] == "q4_0"  # recorded by the step
    assert kinds["token_embd.weight"] == "q4_1"  # not recorded: the default
    reader = gguf.GGUFReader(str(result.path))
    assert reader.fields["kompakt.tensor_types.source"].contents() == "recipe + --tensor-type"


def test_gptq_solves_each_linear_on_its_own_grid_and_exports_exactly(tmp_path):
    loaded = tiny_model("mistral")
    types = {"model.layers.*.mlp.down_proj": "q8_0", "model.layers.0.self_attn.*": "q4_1"}
    report = _run("quant.gptq", loaded, format="q4_0", tensor_types=types, max_blocks=4)
    state = get_state(loaded)
    assert state.per_tensor_types["model.layers.0.self_attn.k_proj"] == "q4_1"
    assert state.types_source == {"source": "recipe", "calibration": "4 blocks of 32 tokens (GPTQ Hessians)"}
    assert set(loaded.gguf_blocks) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}  # q4_1: bytes kept
    assert report.details["grids"] == {"q8_0": 4, "q4_1": 4, "q4_0": 20}
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q4_0")
    assert result.requantized_blocks == 0 and result.exact_grid_tensors == 28
    back = load(result.path, device="cpu")
    for name in ("model.layers.0.self_attn.v_proj", DOWN.format(1), "model.layers.2.mlp.up_proj"):
        assert torch.equal(back.model.get_submodule(name).weight, loaded.model.get_submodule(name).weight), name


def test_awq_searches_each_linear_on_its_own_grid():
    loaded = tiny_model("llama")
    report = _run("quant.awq", loaded, format="q4_0", tensor_types={"model.layers.*.mlp.down_proj": "q8_0"},
                  max_blocks=4, n_grid=20)  # fmt: skip
    assert report.details["scales"]["points"] > 0
    assert get_state(loaded).awq.grid == "q4_0 + model.layers.*.mlp.down_proj=q8_0"
    assert torch.isfinite(loaded.model(torch.tensor([[5, 6, 7]])).logits).all()
    # the same search with down_proj on q4_0: layer 0's attention (same inputs, same grid) is scaled
    # alike, its MLP (down_proj's scales fold into up_proj) is not (a 4-point search happened to
    # choose the same scales on both grids, hence 20)
    plain = tiny_model("llama")
    _run("quant.awq", plain, format="q4_0", max_blocks=4, n_grid=20)
    for role, same in {"self_attn.q_proj": True, "self_attn.o_proj": True, "mlp.up_proj": False, "mlp.down_proj": False}.items():
        name = f"model.layers.0.{role}"
        weights = (loaded.model.get_submodule(name).weight, plain.model.get_submodule(name).weight)
        assert torch.equal(*weights) == same, name


def test_exact_bytes_are_saved_with_the_step_and_read_back(tmp_path):
    from kompakt.rundir.stepsave import save_step_model

    loaded = tiny_model("llama")
    report = _run("quant.rtn", loaded, format="q4_0", tensor_types=MIXED)
    stored = save_step_model(loaded, tmp_path / "step", torch.float32, report.packed_layers)
    assert stored["gguf_blocks"] == 2 and (tmp_path / "step" / BLOCKS_FILE).is_file()
    back = load(tmp_path / "step", device="cpu")
    assert set(back.gguf_blocks) == {V0, Q1}
    assert np.array_equal(back.gguf_blocks[V0].data, loaded.gguf_blocks[V0].data)
    assert get_state(back).per_tensor_types == get_state(loaded).per_tensor_types
    assert write_gguf(back, tmp_path / "m.gguf", type="q4_0").requantized_blocks == 0
    clear_quantization(back)  # a pass moves the weights off the grid: the bytes go with it
    assert back.gguf_blocks == {} and get_state(back).per_tensor_types


def test_bytes_that_no_longer_match_the_weights_are_re_quantized_and_noted(tmp_path):
    loaded = tiny_model("llama")
    _run("quant.rtn", loaded, format="q4_0", tensor_types=MIXED)
    with torch.no_grad():
        loaded.model.get_submodule(V0).weight.mul_(1.01)  # a later step changed it
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q4_0")
    assert any("blk.0.attn_v.weight" in note and "no longer match" in note for note in result.notes)
    stored = _file_tensors(result.path)["blk.0.attn_v.weight"]
    expected = ggml_types.fake_quantize(loaded.model.get_submodule(V0).weight.detach().numpy(), "q5_0")
    assert np.array_equal(gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type), expected)


@pytest.mark.parametrize(
    "values, message",
    [({"format": "q4_0", "tensor_types": {V0: "q7_0"}}, "unknown GGUF type 'q7_0'"),
     ({"tensor_types": {V0: "q8_0"}}, "tensor_types needs `format`"),
     ({"format": "q4_0", "tensor_types": ["q8_0"]}, "expected dict")],
)  # fmt: skip
def test_bad_tensor_types_fail_at_config_time(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(get_pass("quant.rtn"), values)


@pytest.mark.parametrize("name", ["quant.rtn", "quant.gptq", "quant.awq"])
@pytest.mark.parametrize(
    "types, message",
    [({"model.layers.*.mlp.dwn_proj": "q8_0"}, "matches no module this step quantizes"),
     ({DOWN.format(0): "q8_0"}, f"{DOWN.format(0)}=q8_0: rows of 80 are not a multiple of 32"),
     ({"model.embed_tokens": "q8_0", "lm_head": "q4_0"}, r"lm_head.*rows|one tied|matches")],
)  # fmt: skip
def test_bad_keys_fail_before_any_weight_moves(name, types, message):
    loaded = tiny_model("qwen2") if "lm_head" in types else tiny_model("llama", intermediate_size=80)
    before = _weights(loaded)
    with pytest.raises(ConfigError, match=message) as info:
        _run(name, loaded, format="q4_0", tensor_types=types)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[n], w) for n, w in _weights(loaded).items())
    assert get_state(loaded).is_empty() and loaded.gguf_blocks == {}


def test_gptq_on_k_quants_carries_the_exact_bytes_to_the_file(tmp_path):
    """A K-quant grid's weights cannot be recovered from dense values: GPTQ hands its bytes to the
    model, the step save keeps them, and the GGUF holds exactly those bytes (llama.cpp's values)."""
    loaded = tiny_model("llama", hidden_size=256, intermediate_size=512)
    types = {"model.layers.*.mlp.down_proj": "q4_k", V0: "q6_k", Q1: "q3_k"}
    _run("quant.gptq", loaded, format="q4_0", tensor_types=types)
    assert {b.type for b in loaded.gguf_blocks.values()} == {"q4_k", "q6_k", "q3_k"}
    for name, blocks in loaded.gguf_blocks.items():
        w = loaded.model.get_submodule(name).weight.detach().numpy()
        assert np.array_equal(ggml_types.dequantize(blocks.data, blocks.type, w.shape), w), name
    result = write_gguf(loaded, tmp_path / "m.gguf", type="q4_0")
    assert result.requantized_blocks == 0
    tensors = _file_tensors(tmp_path / "m.gguf")
    down = loaded.gguf_blocks[DOWN.format(1)]
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_K"
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(down.data.shape), down.data)


def test_gptq_refuses_a_k_quant_the_rows_cannot_take():
    loaded = tiny_model("llama")
    with pytest.raises(ConfigError, match="rows of 64 are not a multiple of 256"):
        _run("quant.gptq", loaded, format="q4_0", tensor_types={"model.layers.0.self_attn.q_proj": "q6_k"})


def test_qat_trains_each_linear_on_the_type_the_step_before_recorded(tmp_path):
    """QAT after a mixed RTN step keeps every Linear on its own type and the recorded types."""
    import copy

    from kompakt.model.loaded import LoadedModel

    text = tmp_path / "train.txt"
    text.write_text("\n".join("the small model runs a step of text and data." for _ in range(200)) + "\n")
    loaded = tiny_model("llama")
    teacher = LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name="teacher")
    _run("quant.rtn", loaded, format="q4_0", tensor_types=MIXED)
    recorded = dict(get_state(loaded).per_tensor_types)
    spec = get_pass("quant.qat")
    ctx = PassContext(loaded=loaded, original=lambda: teacher, calibration=lambda: None, seed=0, work_dir=tmp_path)
    values = {"data": str(text), "steps": 2, "seq_len": 32, "batch_size": 2, "checkpoint_every": 0, "lr": 1e-2}
    spec.apply(ctx, build_config(spec, values))
    assert get_state(loaded).per_tensor_types == recorded and get_state(loaded).quantization.method == "qat"
    for name, ttype in ((V0, "q5_0"), (DOWN.format(0), "q8_0"), ("model.layers.2.mlp.up_proj", "q4_0")):
        w = loaded.model.get_submodule(name).weight.detach().numpy()
        assert np.array_equal(ggml_types.fake_quantize(w, ttype), w), name  # on its own grid
    assert set(loaded.gguf_blocks) == {V0, Q1}
    assert write_gguf(loaded, tmp_path / "m.gguf", type="q4_0").requantized_blocks == 0
