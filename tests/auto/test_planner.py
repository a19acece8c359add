"""The planner on stated model facts: gentle formats first, pruning only when the analysis says
the floor can hold, back-offs, budgets. (The facts are what model_facts measures; here they are
written out so each rule is tested on its own.)"""

from __future__ import annotations

import pytest

from kompakt.errors import ConfigError
from kompakt.auto.facts import ModelFacts
from kompakt.auto.planner import make_plan
from kompakt.auto.searched_shape import SearchedShape
from kompakt.recipe.schema import DataSpec, Step
from kompakt.auto.target import parse_target

LAYERS = 30


def _parts(layer_params: int, embedding: int, header: int, tied: bool = True) -> dict[str, dict]:
    """GGUF files by part, as kompakt.auto.gguf_bytes computes them (the embedding at Q8_0
    in every quantized type: it is the output)."""
    bits = {"f16": 16, "q8_0": 8.5, "q4_0": 4.5}
    out = {}
    for fmt, b in bits.items():
        emb = int(embedding * (16 if fmt == "f16" else 8.5) / 8)
        layers = int(layer_params * b / 8)
        out[fmt] = {"total": emb + layers + header, "other": header, "embedding": emb, "layers": layers,
                    "embedding_type": "f16" if fmt == "f16" else "q8_0", "embedding_elements": embedding}
    return out


def facts(skip_kl: float = 0.05, quant_kl: float = 0.02, forward_tps: float = 400.0) -> ModelFacts:
    """SmolLM2-135M-like sizes: 30 layers of 3.54 M, 28.3 M tied embedding, 1.6 MB of header."""
    layer, embedding = 3_540_000, 28_311_552
    params = LAYERS * layer + embedding
    parts = _parts(LAYERS * layer, embedding, 1_600_000)
    return ModelFacts(
        name="m", fingerprint="f", params=params, fp16_bytes=2 * params, layers=LAYERS,
        layer_params=[layer] * LAYERS, embedding_params=embedding, gguf=True,
        format_bytes={**{f: v["total"] for f, v in parts.items()}, "int8": params, "int4": 100_000_000},
        forward_tps=forward_tps, skip_kl=[skip_kl + 0.001 * i for i in range(LAYERS)],
        quant_kl=[quant_kl] * LAYERS, block_influence=[0.1 + 0.01 * ((i * 7) % LAYERS) for i in range(LAYERS)],
        gguf_parts=parts,
    )  # fmt: skip


def gemma_facts(quant_kl: float = 0.01) -> ModelFacts:
    """Gemma 3 270M's sizes: 18 layers of 5.6 M, a 262144 x 640 tied embedding (63 %), 15.8 MB of
    tokenizer in the header."""
    layers, layer, embedding = 18, 5_548_544, 262_144 * 640
    params = layers * layer + embedding
    parts = _parts(layers * layer, embedding, 15_800_000)
    return ModelFacts(
        name="g", fingerprint="g", params=params, fp16_bytes=2 * params, layers=layers,
        layer_params=[layer] * layers, embedding_params=embedding, gguf=True,
        format_bytes={**{f: v["total"] for f, v in parts.items()}, "int8": params, "int4": params // 2},
        forward_tps=100.0, skip_kl=[0.5] * layers, quant_kl=[quant_kl] * layers,
        block_influence=[0.1 + 0.01 * i for i in range(layers)], gguf_parts=parts,
    )  # fmt: skip


def names(attempt) -> list[str]:
    return [step.name for step in attempt.steps]


def test_gentlest_format_that_reaches_the_factor_comes_first():
    plan = make_plan(parse_target("size=1.8x"), facts(), DataSpec(), None)
    assert names(plan.attempts[0]) == ["quant.rtn"] and plan.attempts[0].steps[0].config == {"format": "q8_0"}
    assert plan.export_type == "q8_0"


def test_four_bit_is_awq_plus_gptq_on_the_export_grid_with_q8_backoff():
    plan = make_plan(parse_target("size=2.5x"), facts(), DataSpec(), None)
    first, backoff = plan.attempts
    assert names(first) == ["quant.gptq"] and first.steps[0].config["format"] == "q4_0"
    assert first.steps[0].config["awq"] and first.steps[0].config["awq_blocks"] == 16  # AWQ in the same run
    assert backoff.steps[0].config == {"format": "q8_0"} and not backoff.meets_target
    assert plan.export_type == "q4_0"


def test_unreachable_within_floor_keeps_quantization_and_says_why():
    plan = make_plan(parse_target("size=4x,max-kl=0.15"), facts(skip_kl=0.05), DataSpec(), None)
    assert [names(a) for a in plan.attempts] == [["quant.gptq"], ["quant.rtn"]]  # q4_0 (+ AWQ), back-off q8_0
    assert plan.attempts[0].steps[0].config["awq"]
    assert not plan.attempts[0].meets_target
    assert any("not attempted" in c and "predicts KL" in c for c in plan.choices)
    assert any("not reachable" in c for c in plan.choices)


def test_cheap_layers_are_pruned_healed_then_quantized():
    plan = make_plan(parse_target("size=4x,max-kl=0.5"), facts(skip_kl=0.005, quant_kl=0.001), DataSpec(), None)
    first = plan.attempts[0]
    assert names(first)[0] == "prune.depth" and names(first)[-1] == "quant.gptq" and first.steps[-1].config["awq"]
    assert first.meets_target and first.size_factor >= 4.0
    assert names(plan.attempts[1]) == ["quant.gptq"]  # the back-off: no pruning


def test_half_the_model_is_never_removed_for_size():
    plan = make_plan(parse_target("size=5x,max-kl=10"), facts(skip_kl=0.0001, quant_kl=0.0001), DataSpec(), None)
    assert all("prune.depth" not in names(a) for a in plan.attempts)
    assert any("half the model" in c for c in plan.choices)


def test_params_target_is_width_pruning_with_a_gentler_backoff():
    plan = make_plan(parse_target("params=0.5"), facts(), DataSpec(), 3600)
    first, backoff = plan.attempts
    assert first.steps[0].name == "prune.width" and first.steps[0].config["target_params"] == 0.5
    assert backoff.steps[0].config["target_params"] == 0.75


def test_params_target_plans_the_searched_shape_and_backs_off_by_width():
    searched = SearchedShape([Step("prune.depth", {"count": 14, "method": "block_influence", "max_blocks": 8}),
                              Step("prune.width", {"mlp_channels": 896, "max_blocks": 8})],
                             "depth+mlp: 16 layers, hidden 576, MLP 896", 0.497, 2.78, 8, 600.0)  # fmt: skip
    plan = make_plan(parse_target("params=0.5"), facts(), DataSpec(), 3600, searched=searched)
    first, backoff = plan.attempts
    assert names(first) == ["prune.depth", "prune.width", "distill.kd"] and first.params_kept == 0.497
    assert first.steps[:2] == searched.steps
    assert backoff.steps[0].name == "prune.width" and backoff.steps[0].config["target_params"] == 0.75
    assert any("8 shapes searched" in c and "depth+mlp: 16 layers" in c and "then distillation" in c for c in plan.choices)


def test_budget_sizes_calibration_and_can_drop_awq():
    roomy = make_plan(parse_target("size=2.5x"), facts(forward_tps=400), DataSpec(), 3600)
    tight = make_plan(parse_target("size=2.5x"), facts(forward_tps=400), DataSpec(), 200)
    assert roomy.data.calibration_blocks > tight.data.calibration_blocks >= 8
    assert names(tight.attempts[0]) == ["quant.gptq"] and any("AWQ skipped" in c for c in tight.choices)


def test_budget_too_small_for_the_first_step():
    with pytest.raises(ConfigError, match="too small to run even the first step"):
        make_plan(parse_target("size=2.5x"), facts(forward_tps=5), DataSpec(), 60)


def test_plan_round_trips_to_a_valid_recipe():
    from kompakt.recipe.schema import Recipe

    plan = make_plan(parse_target("size=2.5x"), facts(), DataSpec(), None)
    recipe = plan.recipe(0, model="smollm2-135m")
    assert Recipe.from_yaml(recipe.to_yaml()).validate().steps[-1].name == "quant.gptq"


def test_budget_spent_after_the_analysis_plans_the_smallest_steps_instead_of_failing():
    plan = make_plan(parse_target("size=2.5x"), facts(forward_tps=5), DataSpec(), -30, enforce=False)
    assert plan.data.calibration_blocks == 8 and any("nearly spent" in c for c in plan.choices)


def test_each_attempt_exports_on_its_own_grid():
    plan = make_plan(parse_target("size=2.5x"), facts(), DataSpec(), None)
    assert plan.export_type_for(0) == "q4_0" and plan.export_type_for(1) == "q8_0"
    assert plan.recipe(1).exports == [{"format": "gguf", "type": "q8_0"}]


def test_attempts_are_named_by_what_they_run():
    """The stage line names the passes and grid of each attempt (no hand-written "q4_0 only")."""
    plan = make_plan(parse_target("size=4x,max-kl=0.15"), facts(skip_kl=0.05), DataSpec(), None)
    assert [a.describe() for a in plan.attempts] == [
        "quant.awq + quant.gptq on the q4_0 grid", "back-off: quant.rtn on the q8_0 grid"]  # fmt: skip
    pruned = make_plan(parse_target("size=4x,max-kl=0.5"), facts(skip_kl=0.005, quant_kl=0.001), DataSpec(), None)
    runs = pruned.attempts[0].describe()
    assert runs.startswith("prune.depth ") and " layers → distill.kd " in runs
    assert runs.endswith("→ quant.awq + quant.gptq on the q4_0 grid")


def test_a_tiny_budget_is_named_in_seconds():
    with pytest.raises(ConfigError, match=r"--budget 1 s is too small"):
        make_plan(parse_target("size=2.5x"), facts(), DataSpec(), 1.0)


def test_a_plan_line_never_asks_for_more_layers_than_the_model_has():
    """Gemma 3 at 4x: it once said "needs removing 33 of 18 layers on top of q4_0"."""
    import re

    plan = make_plan(parse_target("size=4x"), gemma_facts(), DataSpec(), None)
    for choice in plan.choices:
        for drop, total in re.findall(r"removing (\d+) of (\d+) layers", choice):
            assert int(drop) <= int(total), choice
    line = next(c for c in plan.choices if "cannot come from removing layers" in c)
    assert "the embedding, not the layers, holds the bytes" in line
    assert "embedding at Q4_0" in line and "not attempted" in line
    assert all("prune.depth" not in names(a) for a in plan.attempts)


def test_the_plan_says_what_it_does_about_a_dominant_embedding():
    plan = make_plan(parse_target("size=4x"), gemma_facts(), DataSpec(), None)
    line = next(c for c in plan.choices if c.startswith("embedding (tied to the output, Q8_0)"))
    parts = plan.facts.gguf_parts["q4_0"]
    assert f"({parts['embedding'] / parts['total']:.0%})" in line and "63 %" not in line and "(63%)" in line
    with_q4 = plan.facts.fp16_bytes / (parts["total"] - parts["embedding"] + parts["embedding_elements"] // 32 * 18)
    assert f"{plan.facts.size_factor('q4_0'):.2f}x" in line and f"{with_q4:.2f}x" in line and line.endswith("kept")
    assert 2.1 < plan.facts.size_factor("q4_0") < 2.2 < 3.0 < with_q4  # 4-bit layers alone cannot pass 2.2x here


def test_attempts_carry_the_bytes_export_will_write():
    plan = make_plan(parse_target("size=2.5x"), facts(), DataSpec(), None)
    q4, q8 = plan.attempts
    assert q4.predicted_bytes == plan.facts.format_bytes["q4_0"] and q8.predicted_bytes == plan.facts.format_bytes["q8_0"]
    pruned = make_plan(parse_target("size=4x,max-kl=0.5"), facts(skip_kl=0.005, quant_kl=0.001), DataSpec(), None)
    first = pruned.attempts[0]
    assert first.predicted_bytes <= pruned.facts.fp16_bytes / 4 < plan.facts.format_bytes["q4_0"]
