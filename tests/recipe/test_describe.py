"""`passes show` data: every registered pass has typed, documented fields and valid samples."""

from __future__ import annotations

import pytest

from kompakt.passes.base import registry
from kompakt.recipe.describe import describe_pass
from kompakt.recipe.schema import Recipe, Step

PASSES = sorted(registry())


@pytest.mark.parametrize("name", PASSES)
def test_samples_of_every_pass_validate(name):
    info = describe_pass(name)
    assert info["summary"] and info["fields"]
    for text in info["sample_yaml"]:
        Recipe.from_yaml(f"steps:\n{text}\n").validate()
    for spec in info["sample_cli"]:
        Step.parse(spec).resolved()


def test_depth_fields_are_documented():
    fields = {f["name"]: f for f in describe_pass("prune.depth")["fields"]}
    assert fields["method"]["default"] == "block_influence" and fields["iterative"]["default"] == "false"
    assert all(f["doc"] for f in fields.values())
