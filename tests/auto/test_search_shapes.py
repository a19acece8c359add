"""Candidate shapes of the architecture search: within ±3 % of the target, loadable widths, spread
over the kinds of cut, and the passes really cut the model to the predicted parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kompakt.auto.search.shapes import ParamCounter, candidates, shape_steps, width_unit
from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import tiny_model, tiny_tokenizer
from kompakt.passes.base import PassContext, registry

# SmolLM2-135M's config (the embedded model), built on the meta device: no weights, exact counts.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192)  # fmt: skip


def _smollm2() -> LoadedModel:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMOLLM2))
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="smollm2-config")


def _check(loaded: LoadedModel, keep: float, count: int) -> list:
    origin, shapes = candidates(loaded, keep, count)
    unit = width_unit(origin)
    assert 1 <= len(shapes) <= count
    assert len({s.key for s in shapes}) == len(shapes)  # deduplicated
    for shape in shapes:
        assert abs(shape.params / (keep * origin.params) - 1) <= 0.03, shape
        assert shape.hidden % unit == 0 and shape.intermediate % unit == 0, shape
        assert shape.heads * origin.kv_groups == shape.kv_groups * origin.heads  # GQA groups kept whole
        assert origin.kind(shape), "every candidate cuts something"
    return shapes


def test_smollm2_candidates_are_within_target_and_exact():
    loaded = _smollm2()
    shapes = _check(loaded, 0.5, 8)
    origin, _ = candidates(loaded, 0.5, 8)
    assert len(shapes) == 8
    kinds = {origin.kind(s) for s in shapes}
    assert ("depth",) in kinds and ("mlp",) in kinds and any(len(k) >= 3 for k in kinds)
    assert all(s.hidden % 64 == 0 and s.intermediate % 64 == 0 for s in shapes)
    counter = ParamCounter(loaded, origin)
    for shape in shapes[:3]:  # the linear count against a full meta build of that shape
        assert counter._build(shape.layers, shape.hidden, shape.intermediate, shape.kv_groups) == shape.params


CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _cut(loaded: LoadedModel, origin, shape) -> LoadedModel:
    """The original cut to `shape` by the steps the search runs (importance-scored passes)."""
    model = LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name="cut")
    for step in shape_steps(origin, shape, blocks=4):
        spec, config = step.spec_and_config()
        ctx = PassContext(loaded=model, original=lambda: loaded, calibration=lambda: CALIBRATION, seed=0)
        model = spec.apply(ctx, config).loaded
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_candidates_cut_to_the_predicted_count(family):
    loaded = tiny_model(family)
    shapes = _check(loaded, 0.5, 8)
    origin, _ = candidates(loaded, 0.5, 8)
    assert len({origin.kind(s) for s in shapes}) >= 3
    for shape in shapes:
        model = _cut(loaded, origin, shape)
        assert model.num_parameters() == shape.params, shape
        assert model.model(input_ids=CALIBRATION[:1]).logits.shape[-1] == loaded.model.config.vocab_size
    assert "prune.depth" in registry() and "prune.width" in registry()


def test_every_candidate_reloads_in_transformers_and_llama_cpp(tmp_path):
    """Uniform widths are the point: each cut saves, reloads with the same logits, and runs in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from kompakt.export.gguf import export_gguf
    from kompakt.model.load import load

    loaded = tiny_model("llama")
    origin, shapes = candidates(loaded, 0.5, 8)
    ids = CALIBRATION[:1, :16]
    for index, shape in enumerate(shapes):
        model = _cut(loaded, origin, shape)
        model.model.save_pretrained(tmp_path / f"hf{index}")
        model.tokenizer.save_pretrained(tmp_path / f"hf{index}")
        again = load(tmp_path / f"hf{index}")
        assert torch.allclose(again.model(input_ids=ids).logits, model.model(input_ids=ids).logits, atol=1e-5)
        path = export_gguf(model, tmp_path / f"m{index}.gguf", type="f16")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
        llm.eval(ids[0].tolist())
        assert llm.n_tokens == ids.shape[1]


def test_impossible_target_is_one_config_error():
    with pytest.raises(ConfigError, match="--target params="):
        candidates(tiny_model("llama"), 0.02, 8)
    with pytest.raises(ConfigError, match="at least 1"):
        candidates(tiny_model("llama"), 0.5, 0)
