"""Mixed precision in the plan (kompakt.auto.mixed): the planner's decisions on both embedded
models' measured facts, the recipe contract the quant steps carry, file bytes that add up to
the export's, and a bytes= budget below the smallest file stopped before work.

tests/auto/data/facts-*.json are ModelFacts of SmolLM2-135M and Gemma 3 270M as `compress`
measures them (model_facts + the per-tensor sensitivity on 2048 self-generated calibration
tokens, KL values rounded to 4 digits); regenerate them when the sensitivity or the layout
changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


from kompakt.auto.facts import ModelFacts
from kompakt.auto.kept_share import kept_of_rtn
from kompakt.auto.mixed import is_layer, smallest_file
from kompakt.auto.planner import make_plan
from kompakt.auto.target import parse_target
from kompakt.errors import ConfigError
from kompakt.recipe.schema import DataSpec

DATA = Path(__file__).parent / "data"
DEFAULT = DataSpec(calibration_blocks=8, block_len=512, eval_tokens=4096, window=512, stride=512)


def embedded(name: str) -> ModelFacts:
    return ModelFacts(**json.loads((DATA / f"facts-{name}.json").read_text()))


def _types(attempt, facts: ModelFacts) -> dict[str, str]:
    """Each tensor's type as the attempt's quant step asks for it (format + tensor_types)."""
    config = attempt.steps[-1].config
    return {t["name"]: config["tensor_types"].get(t["name"], config["format"]) for t in facts.tensors}


def _file_bytes(facts: ModelFacts, types: dict[str, str]) -> int:
    return facts.gguf_fixed_bytes + sum(t["bytes"][types[t["name"]]] for t in facts.tensors)


@pytest.mark.parametrize("name, reach", [("smollm2-135m", 3.3), ("gemma3-270m", 2.2)])
def test_default_target_on_the_embedded_models(name, reach):
    """The default target (size=4x, max-kl=0.15) on the measured facts: the first attempt is the
    fewest bytes predicted within the floor, past what one type for all reaches (SmolLM2 Q4_0
    2.93x; Gemma 3 2.14x), with the embedding below Q8_0 (facts of the release's own runs:
    SmolLM2 plans 3.47x; its back-off measured 3.25x at KL 0.104)."""
    facts = embedded(name)
    plan = make_plan(parse_target(None), facts, DEFAULT, None)
    first = plan.attempts[0]
    assert first.size_factor >= reach > facts.size_factor("q4_0") and first.predicted_kl <= 0.9 * 0.15
    assert [s.name for s in first.steps] == ["quant.gptq"] and first.steps[0].config["awq"]  # AWQ in the same run
    types = _types(first, facts)
    assert 0 < first.predicted_bytes - _file_bytes(facts, types) <= 512  # + the header's type-source keys
    assert types["model.embed_tokens"] in ("q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0")  # one decision, tied
    assert set(types.values()) <= {"q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "iq4_nl", "q4_0", "q3_k"}
    assert "model.embed_tokens" in first.steps[-1].config["tensor_types"]  # the export's, named explicitly
    line = next(c for c in plan.choices if "mixed precision" in c)
    assert "token_embd" in line and "predicted KL" in line and f"{first.size_factor:.2f}x" in line
    looser, q8 = plan.attempts[1], plan.attempts[-1]
    assert first.predicted_bytes < looser.predicted_bytes < q8.predicted_bytes == facts.format_bytes["q8_0"]
    assert first.predicted_kl > looser.predicted_kl > q8.predicted_kl
    assert plan.export_type == first.steps[-1].config["format"]


def test_a_reachable_size_takes_the_lowest_kl_within_its_bytes():
    facts = embedded("smollm2-135m")
    plan = make_plan(parse_target("size=3x,max-kl=0.5"), facts, DEFAULT, None)
    first = plan.attempts[0]
    assert first.meets_target and first.predicted_bytes <= facts.fp16_bytes / 3
    assert first.predicted_bytes > 0.99 * facts.fp16_bytes / 3  # the budget is spent on lower KL
    roomy = make_plan(parse_target("size=1.5x,max-kl=0.5"), facts, DEFAULT, None).attempts[0]
    kept = kept_of_rtn("quant.awq+quant.gptq", allocated=True)
    least = sum(min(t["kl"][x] * (kept if is_layer(t) else 1) for x in t["kl"] if x != "f16") for t in facts.tensors)
    assert roomy.predicted_kl == pytest.approx(least)
    # The embedded SmolLM2 is a Q4_1 GGUF: its layers lie on the q4_1 grid, which AWQ / GPTQ do
    # not keep, so q4_1 is not free (tensor_sensitivity's on-grid rule): with room, all is q8_0.
    assert set(_types(roomy, facts).values()) == {"q8_0"}


def test_all_eight_bit_is_plain_rounding():
    from kompakt.auto.allocate import Allocation
    from kompakt.auto.mixed import mixed_steps

    facts = embedded("smollm2-135m")
    allocation = Allocation({t["name"]: "q8_0" for t in facts.tensors}, 0, 0.0)
    steps = mixed_steps(allocation, facts, 8, with_awq=True)
    assert [s.name for s in steps] == ["quant.rtn"] and steps[0].config["format"] == "q8_0"
    assert steps[0].config["tensor_types"] == {"model.embed_tokens": "q8_0"}


def test_gptq_alone_keeps_more_of_the_layers_kl_than_awq_plus_gptq():
    facts = embedded("gemma3-270m")
    roomy = make_plan(parse_target("size=2.5x,max-kl=1"), facts, DEFAULT, None).attempts[0]
    tight = make_plan(parse_target("size=2.5x,max-kl=1"), facts, DEFAULT, 200, enforce=False).attempts[0]
    assert [s.name for s in tight.steps] == ["quant.gptq"] and tight.predicted_kl > roomy.predicted_kl
    layer_rtn = sum(t["kl"][_types(tight, facts)[t["name"]]] for t in facts.tensors if is_layer(t))
    embedding = sum(t["kl"][_types(tight, facts)[t["name"]]] for t in facts.tensors if not is_layer(t))
    kept = kept_of_rtn("quant.gptq", allocated=True)
    assert tight.predicted_kl == pytest.approx(kept * layer_rtn + embedding)  # the export rounds the embedding


def test_an_allocation_is_predicted_to_keep_more_of_its_rounding_kl_than_one_type():
    """The knapsack favours the tensor costs that were estimated low, so an allocation keeps a
    larger share of its predicted KL than a uniform type (kompakt.auto.kept_share)."""
    for method in ("quant.gptq", "quant.awq+quant.gptq"):
        assert kept_of_rtn(method) < kept_of_rtn(method, allocated=True) <= 1.0
    assert kept_of_rtn("quant.rtn", allocated=True) == 1.0


def test_bytes_below_the_smallest_file_is_one_line_and_a_size_beyond_it_aims_at_it():
    facts = embedded("gemma3-270m")
    smallest = smallest_file(facts)
    with pytest.raises(ConfigError, match="below the smallest GGUF file") as error:
        make_plan(parse_target(f"bytes={smallest - 1_000_000}B"), facts, DEFAULT, None)
    assert "\n" not in str(error.value) and f"{smallest / 1e6:.1f} MB" in str(error.value)
    plan = make_plan(parse_target("size=10x,max-kl=100"), facts, DEFAULT, None)
    assert 0 < plan.attempts[0].predicted_bytes - smallest <= 512 and any("beyond the smallest file" in c for c in plan.choices)


def test_plan_round_trips_with_the_tensor_costs():
    from kompakt.auto.planner import Plan

    plan = make_plan(parse_target(None), embedded("smollm2-135m"), DEFAULT, None)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.facts.tensors == plan.facts.tensors and again.attempts[0].steps == plan.attempts[0].steps


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_the_layout_adds_up_to_the_file_export_writes(family, tmp_path):
    """Fixed bytes + each matrix in its type = gguf_bytes' total (the export's own plan and header)
    for the uniform types, so a per-tensor allocation's bytes are the file's."""
    from kompakt.auto.gguf_bytes import fixed_with_source, gguf_bytes, tensor_layout
    from kompakt.export.gguf import prepare_gguf
    from kompakt.model.tiny import save_tiny

    loaded = save_tiny(family, tmp_path / "m")
    layout, sizes = tensor_layout(loaded), gguf_bytes(loaded)
    for ttype in ("q8_0", "q4_0"):
        plan = prepare_gguf(loaded, ttype)[3]
        types = {i.hf_name.removesuffix(".weight"): i.type for i in plan.tensors if len(i.shape) == 2}
        assert set(types) == set(layout.tensors)
        fixed = fixed_with_source(layout.fixed, layout.header, layout.align, {"source": "--type"})
        assert fixed + sum(layout.tensor_bytes(n, t) for n, t in types.items()) == sizes[ttype].total


def test_compress_stops_a_bytes_target_below_the_smallest_file_before_work(tmp_path):
    from kompakt.auto.api import compress_auto
    from kompakt.model.tiny import save_tiny

    save_tiny("llama", tmp_path / "m")
    with pytest.raises(ConfigError, match="below the smallest GGUF file"):
        compress_auto(str(tmp_path / "m"), target="bytes=100KB", out=tmp_path / "run", plan_only=True)
    assert not (tmp_path / "run" / "analysis").exists()


def test_a_crossed_mixed_attempt_is_reallocated_with_the_measured_ratio():
    """SmolLM2's first attempt measured 0.187 where 0.135 was predicted: the next attempt is the
    allocation for the floor with the prediction scaled by that ratio, between the attempt and
    the back-off planned up front; a rerun following the saved plan does not add it twice."""
    from kompakt.auto.planner import reallocated

    plan = make_plan(parse_target(None), embedded("smollm2-135m"), DEFAULT, None)
    first, planned = plan.attempts[0], plan.attempts[1]
    again = reallocated(plan, 0, first.predicted_kl * 1.39)
    assert again is not None and again.label.endswith("(re-allocated)")
    assert first.predicted_bytes < again.predicted_bytes < planned.predicted_bytes
    assert again.predicted_kl == pytest.approx(0.9 * 0.15 / 1.39, rel=0.05)
    assert any("re-allocated for the floor" in c for c in plan.choices)
    assert reallocated(plan, 0, first.predicted_kl * 0.9) is None  # measured below the prediction
    plan.attempts.insert(1, again)
    assert reallocated(plan, 0, first.predicted_kl * 1.39) is None  # already there
