"""The typed compression state: round trip through save -> load, config.json as written before it
existed still loads, empty fields write nothing, a malformed grid or malformed
per-tensor types refuse to load (one line), exact GGUF bytes round-trip beside the weights, packed layers live in the pass report only, and no other module names its keys."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest

import kompakt
from kompakt.errors import ModelFormatError
from kompakt.export.gguf import grid_modules
from kompakt.model.compression import (
    AwqScaling,
    CompressionState,
    LowRank,
    PackedLayer,
    Quantization,
    clear_quantization,
    clear_state,
    compressed_tensors_config,
    get_state,
    set_state,
    update_state,
)
from kompakt.model.load import load
from kompakt.model.quantized import is_quantized
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
# config.json entries exactly as quant.gptq / quant.awq wrote them before the typed state
OLD_QUANTIZATION = {"method": "gptq", "format": "int4", "bits": 4, "group_size": 64, "symmetric": True,
                    "modules": DOWN, "group_sizes": {DOWN[0]: 32}}  # fmt: skip
OLD_AWQ = {"grid": "int4 g64 sym", "clip": True}


TYPES = {DOWN[0]: "q8_0", "model.layers.0.self_attn.v_proj": "f16", "model.embed_tokens": "q6_k"}
FACTORS = {"lowrank": {"model.layers.2.mlp.up_proj": LowRank(rank=8, method="svd")}}


def _state() -> CompressionState:
    return CompressionState(
        quantization=Quantization("rtn", "q4_0", 4, 32, True, tuple(DOWN), {DOWN[1]: 16}),
        awq=AwqScaling("q4_0", clip=False),
    )


def _config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_old_config(directory: Path, **entries) -> None:
    config = _config_json(directory)
    config.update(entries)
    (directory / "config.json").write_text(json.dumps(config))


def test_state_round_trips_through_save_and_load(tmp_path):
    loaded = tiny_model("llama")
    state = _state()
    set_state(loaded, state)
    assert get_state(loaded) == state and get_state(loaded.model) == state  # LoadedModel or model
    back = load(save_model(loaded, tmp_path / "m"), device="cpu")
    assert get_state(back) == state
    on_disk = _config_json(tmp_path / "m")
    assert on_disk["kompakt_quantization"] == {"method": "rtn", "format": "q4_0", "bits": 4, "group_size": 32,
                                               "symmetric": True, "modules": DOWN,
                                               "group_sizes": {DOWN[1]: 16}}  # fmt: skip
    assert on_disk["kompakt_awq"] == {"grid": "q4_0", "clip": False}


def test_config_json_written_before_the_typed_state_still_loads(tmp_path):
    save_model(tiny_model("llama"), tmp_path / "old")
    _write_old_config(tmp_path / "old", kompakt_quantization=OLD_QUANTIZATION, kompakt_awq=OLD_AWQ)
    back = load(tmp_path / "old", device="cpu")
    state = get_state(back)
    assert state.quantization == Quantization("gptq", "int4", 4, 64, True, tuple(DOWN), {DOWN[0]: 32})
    assert state.awq == AwqScaling("int4 g64 sym", clip=True)
    assert is_quantized(back) and not state.lowrank
    # saved again unchanged: the same config.json entries
    save_model(back, tmp_path / "again")
    assert _config_json(tmp_path / "again")["kompakt_quantization"] == OLD_QUANTIZATION


def test_minimal_grid_form_reads_for_gguf_export(tmp_path):
    """{"format", "modules"}: what early exports and hand-written configs carry."""
    save_model(tiny_model("llama"), tmp_path / "old")
    _write_old_config(tmp_path / "old", kompakt_quantization={"format": "q8_0", "modules": DOWN})
    back = load(tmp_path / "old", device="cpu")
    quantization = get_state(back).quantization
    assert quantization.gguf_format == "q8_0" and quantization.bits == 8 and quantization.modules == tuple(DOWN)
    assert grid_modules(back.model) == dict.fromkeys(DOWN, "q8_0")


def test_empty_fields_write_nothing_and_clear_removes_keys(tmp_path):
    loaded = tiny_model("llama")
    assert get_state(loaded).is_empty() and not is_quantized(loaded)
    save_model(loaded, tmp_path / "plain")
    assert not [k for k in _config_json(tmp_path / "plain") if k.startswith("kompakt_")]
    set_state(loaded, CompressionState(quantization=_state().quantization, awq=_state().awq,
                                       per_tensor_types=TYPES, **FACTORS))  # fmt: skip
    clear_state(loaded)
    assert get_state(loaded).is_empty()
    save_model(loaded, tmp_path / "cleared")
    assert not [k for k in _config_json(tmp_path / "cleared") if k.startswith("kompakt_")]


def test_per_tensor_types_round_trip_and_survive_clear_quantization(tmp_path):
    """The slot the mixed-precision quant steps fill: it loads (no longer refused) and stays when
    the weights leave their grid (a type choice, not a grid claim)."""
    loaded = tiny_model("llama")
    set_state(loaded, CompressionState(quantization=_state().quantization, per_tensor_types=TYPES))
    back = load(save_model(loaded, tmp_path / "m"), device="cpu")
    assert get_state(back).per_tensor_types == TYPES
    assert _config_json(tmp_path / "m")["kompakt_gguf_types"] == TYPES
    clear_quantization(back)
    assert get_state(back).quantization is None and get_state(back).per_tensor_types == TYPES


@pytest.mark.parametrize("entry", [{DOWN[0]: "q7_0"}, ["q8_0"]])
def test_malformed_per_tensor_types_refuse_to_load(entry, tmp_path):
    save_model(tiny_model("llama"), tmp_path / "bad")
    _write_old_config(tmp_path / "bad", kompakt_gguf_types=entry)
    with pytest.raises(ModelFormatError, match="malformed kompakt_gguf_types") as info:
        load(tmp_path / "bad", device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "entry, reason",
    [({"format": "nf4", "modules": DOWN}, "unknown format 'nf4'"),
     ({"format": "int4", "bits": "four", "modules": DOWN}, "must be integers"),
     ({"format": "q8_0", "modules": DOWN[0]}, "list of module names"),
     (["int4"], "not a mapping")],
)  # fmt: skip
def test_a_malformed_grid_refuses_to_load(entry, reason, tmp_path):
    save_model(tiny_model("llama"), tmp_path / "bad")
    _write_old_config(tmp_path / "bad", kompakt_quantization=entry)
    with pytest.raises(ModelFormatError, match="malformed kompakt_quantization") as info:
        load(tmp_path / "bad", device="cpu")
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_packed_layers_live_in_the_pass_report_only():
    """The step is saved from PassReport.packed_layers; nothing else keeps a second copy."""
    spec = get_pass("quant.rtn")
    loaded = tiny_model("llama")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: None, seed=0)
    report = spec.apply(ctx, build_config(spec, {"bits": 4, "group_size": 32}))
    assert isinstance(report.packed_layers[DOWN[0]], PackedLayer)
    assert set(report.packed_layers) == set(get_state(loaded).quantization.modules)
    alive = weakref.ref(report.packed_layers[DOWN[0]])
    del report
    gc.collect()
    assert alive() is None


def test_clear_quantization_keeps_awq_and_drops_a_compressed_tensors_config():
    loaded = tiny_model("llama")
    update_state(loaded, quantization=Quantization.from_json(OLD_QUANTIZATION), awq=AwqScaling.from_json(OLD_AWQ))
    loaded.model.config.quantization_config = {"quant_method": "compressed-tensors"}  # as a reloaded step has
    for target in (loaded, loaded.model, loaded.model.config):
        assert compressed_tensors_config(target) == {"quant_method": "compressed-tensors"}
    assert is_quantized(loaded)
    clear_quantization(loaded)
    assert compressed_tensors_config(loaded) is None
    assert not is_quantized(loaded) and get_state(loaded).awq == AwqScaling("int4 g64 sym", clip=True)


def test_only_the_contract_names_its_keys():
    src = Path(kompakt.__file__).parent
    owner = src / "model" / "compression.py"
    keys = ("kompakt_quantization", "kompakt_awq", "kompakt_packed", "kompakt_gguf_types", "kompakt_lowrank",
            "kompakt_shared")  # fmt: skip
    offenders = [str(path.relative_to(src)) for path in src.rglob("*.py")
                 if path != owner and any(key in path.read_text() for key in keys)]  # fmt: skip
    assert offenders == []
