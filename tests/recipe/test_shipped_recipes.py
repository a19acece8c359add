"""Every recipe shipped in recipes/ parses, validates (no weights loaded) and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from kompakt.recipe.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert RECIPES, "recipes/ holds no *.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = Recipe.from_file(path)
    resolved = recipe.validate()
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_yaml(resolved.to_yaml()) == resolved
