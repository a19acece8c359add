"""Recipes: YAML <-> Recipe objects, and the stepwise runner (save, evaluate, record, resume)."""

from __future__ import annotations

from kompakt.recipe.runner import GateError, RunResult, run_recipe
from kompakt.recipe.schema import DataSpec, Gates, Recipe, Step

__all__ = ["DataSpec", "GateError", "Gates", "Recipe", "RunResult", "Step", "run_recipe"]
