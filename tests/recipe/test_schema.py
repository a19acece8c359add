"""Recipe YAML <-> objects: exact round trip, unknown keys, bad values — all without weights."""

from __future__ import annotations

import pytest

from kompakt.errors import ConfigError
from kompakt.recipe.schema import DataSpec, Gates, Recipe, Step

TEXT = """\
model: smollm2-135m
seed: 3
data:
  calibration: calib.txt
  evaluation: null
  calibration_blocks: 16
  block_len: 128
  eval_tokens: 2048
  window: 256
  stride: 256
metrics: [ppl, kl, top1]
gates:
  max_ppl_ratio: 1.5
  max_kl: null
  min_top1: 0.5
  min_cosine: null
steps:
- prune.depth: {fraction: 0.25}
- prune.depth: {count: 1, method: kl, iterative: true}
exports:
- {format: hf}
"""


def test_yaml_round_trip_is_exact():
    recipe = Recipe.from_yaml(TEXT)
    assert recipe.to_yaml() == TEXT
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.steps[0] == Step("prune.depth", {"fraction": 0.25})
    assert recipe.data.block_len == 128 and recipe.gates.min_top1 == 0.5


def test_objects_round_trip_with_defaults():
    recipe = Recipe(steps=[Step("prune.depth", {"count": 1})], gates=Gates(max_kl=0.3), data=DataSpec(eval_tokens=1024))
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_minimal_recipe_gets_defaults():
    recipe = Recipe.from_yaml("steps:\n  - prune.depth: {count: 1}\n  - prune.depth\n")
    assert recipe.model is None and recipe.seed == 0 and recipe.data.calibration is None
    assert recipe.steps[1] == Step("prune.depth", {})


def test_validate_resolves_step_configs():
    resolved = Recipe.from_yaml("steps:\n  - prune.depth: {fraction: 0.25}\n").validate()
    config = resolved.steps[0].config
    assert config["fraction"] == 0.25 and config["method"] == "block_influence" and config["count"] is None
    assert Recipe.from_yaml(resolved.to_yaml()) == resolved


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("modle: x\nsteps: [prune.depth]\n", "unknown key(s) modle; valid keys: model, seed, data"),
        ("data: {calib: x}\nsteps: [prune.depth]\n", "data: unknown key(s) calib; valid keys: calibration"),
        ("gates: {max_ppl: 2}\nsteps: [prune.depth]\n", "gates: unknown key(s) max_ppl; valid keys: max_ppl_ratio"),
        ("steps:\n  - prune.nothing: {}\n", "unknown pass 'prune.nothing'; available: "),
        ("steps:\n  - prune.depth: {fractoin: 0.2}\n", "unknown field(s) fractoin; valid fields: count, fraction"),
        ("steps:\n  - prune.depth: {fraction: 1.5}\n", "fraction must be in (0, 1)"),
        ("steps:\n  - prune.depth: {fraction: 0.0}\n", "fraction must be in (0, 1)"),
        ("steps:\n  - prune.depth: {fraction: 0.2, count: 2}\n", "exactly one of count or fraction"),
        ("steps:\n  - prune.depth: {count: 1, method: magic}\n", "unknown method 'magic'"),
        ("steps:\n  - prune.depth: {count: x}\n", "field count got 'x'"),
        ("metrics: [ppl]\ngates: {max_kl: 0.1}\nsteps: [prune.depth]\n", "gate max_kl needs metric 'kl'"),
        ("metrics: [ppl]\ngates: {min_top1: 0.9}\nsteps: [prune.depth]\n", "gate min_top1 needs metric 'top1'"),
        ("metrics: [ppl, bleu]\nsteps: [prune.depth]\n", "unknown metric(s) bleu"),
        ("steps: []\n", "no steps"),
        ("steps:\n  - {a: 1, b: 2}\n", "one-key mapping"),
        ("data: {block_len: 0}\nsteps: [prune.depth]\n", "data.block_len must be a positive integer"),
        ("data: {window: 256, stride: 512}\nsteps: [prune.depth]\n", "must not exceed data.window"),
        ("exports: {format: hf}\nsteps: [prune.depth]\n", "exports must be a list of mappings"),
        ("steps: [prune.depth\n", "not valid YAML"),
        ("- just a list\n", "a recipe is a mapping"),
    ],
)
def test_bad_recipes_are_one_line_config_errors(text, needle):
    with pytest.raises(ConfigError) as caught:
        Recipe.from_yaml(text).validate()
    message = str(caught.value)
    assert needle in message
    assert "\n" not in message


def test_step_shortcut():
    step = Step.parse("prune.sparse:method=wanda,sparsity=0.5")
    assert step == Step("prune.sparse", {"method": "wanda", "sparsity": "0.5"})
    assert Step.parse("prune.depth") == Step("prune.depth", {})
    assert Step.parse("prune.depth:count=none").config == {"count": None}
    resolved = Step.parse("prune.depth:fraction=0.25,iterative=true").resolved()
    assert resolved.config["fraction"] == 0.25 and resolved.config["iterative"] is True
    for bad in (":x=1", "prune.depth:fraction", "prune.depth:=3"):
        with pytest.raises(ConfigError):
            Step.parse(bad)


def test_step_shortcut_reads_lists_mappings_and_quoted_commas_as_yaml():
    assert Step.parse("share.basis:group_sizes=[2, 4],side=in").config == {"group_sizes": [2, 4], "side": "in"}
    step = Step.parse("distill.kd:layer_map=[[1, 2], [3, 6]],steps=5,hidden_weight=1.0")
    assert step.config == {"layer_map": [[1, 2], [3, 6]], "steps": "5", "hidden_weight": "1.0"}
    assert step.resolved().config["layer_map"] == [[1, 2], [3, 6]] and step.resolved().config["steps"] == 5
    nested = Step.parse("""x:a={b: 1, c: [1, {d: "p,q"}]}, e="x,y",f='[z]',g=[]""").config
    assert nested == {"a": {"b": 1, "c": [1, {"d": "p,q"}]}, "e": "x,y", "f": "[z]", "g": []}
    # plain values stay text for the pass to type: YAML 1.1 would read 2:4 as 124 and no as false
    assert Step.parse("prune.sparse:nm=2:4,method=sparsegpt").config == {"nm": "2:4", "method": "sparsegpt"}
    assert Step.parse("prune.sparse:nm=2:4").resolved().config["nm"] == "2:4"
    assert Step.parse("x:teacher=./it's here,lr=1e-3,name=no").config == {"teacher": "./it's here", "lr": "1e-3",
                                                                            "name": "no"}  # fmt: skip


@pytest.mark.parametrize("bad, needle", [
    ("x:a=[1, 2", "']' is missing"), ("x:a=1]", "closing nothing"), ("x:a=[1, {]", "where '}' should close"),
    ('x:a="p,q', "'\"' is missing"), ("x:a=[a: b: c]", "not a YAML value"),
])  # fmt: skip
def test_step_shortcut_refuses_unbalanced_values_in_one_line(bad, needle):
    with pytest.raises(ConfigError) as caught:
        Step.parse(bad)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_passes_show_writes_cli_values_that_parse_back():
    from kompakt.recipe.describe import _cli

    config = {"target_params": 0.4, "group_sizes": [2, 4], "layer_map": [[1, 2]], "a": {"b": "x,y"}, "d": "p,q",
              "e": "[z]", "f": None, "g": True, "targets": ["*.mlp.*"]}  # fmt: skip
    line = _cli({"share.basis": config})
    assert "group_sizes=[2, 4]" in line and "'" not in line  # shlex.quote wraps it in single quotes
    parsed = Step.parse(line).config
    assert parsed == {**config, "target_params": "0.4", "g": "true"}  # plain scalars stay text for the pass
