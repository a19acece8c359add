"""Build the Recipe a `kompakt compress` call asks for: a recipe file, --step shortcuts, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kompakt.errors import ConfigError
from kompakt.recipe.schema import Recipe, Step


def compose_recipe(
    *,
    recipe: str | Path | None = None,
    steps: list[str] | None = None,
    model: str | None = None,
    data: str | None = None,
    seed: int | None = None,
) -> Recipe:
    """A recipe file (with model / data / seed overrides), or a recipe made of --step shortcuts.

    Raises:
        ConfigError: both or neither of recipe and steps.
    """
    steps = list(steps or [])
    if recipe is not None and steps:
        raise ConfigError("give either --recipe or --step, not both (put the steps in the recipe)")
    if recipe is None and not steps:
        raise ConfigError("nothing to do: give --recipe FILE or at least one --step PASS:key=value")
    if recipe is not None:
        result = Recipe.from_file(recipe)
    else:
        result = Recipe(steps=[Step.parse(spec) for spec in steps])
    if model is not None:
        result = dataclasses.replace(result, model=model)
    if data is not None:
        result = dataclasses.replace(result, data=dataclasses.replace(result.data, calibration=data))
    if seed is not None:
        result = dataclasses.replace(result, seed=seed)
    return result
