"""Run a recipe in a separate process with the test passes registered (for the kill -9 test).

Usage: python run_script.py RECIPE.yaml OUT_DIR  -> prints one JSON line: skipped flags per step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from recipe_helpers import register_test_passes  # noqa: E402

from kompakt.recipe.runner import run_recipe  # noqa: E402
from kompakt.recipe.schema import Recipe  # noqa: E402

register_test_passes()
result = run_recipe(Recipe.from_file(sys.argv[1]), sys.argv[2])
print(json.dumps({"skipped": [record["skipped"] for record in result.records]}))
