"""Run a streamed recipe in a separate process (for the kill -9 resume test).

Usage: python stream_kill_script.py RECIPE.yaml OUT_DIR MAX_MEMORY
With KOMPAKT_TEST_LAYER_PAUSE=seconds the process pauses after writing decoder layer 1 (its
progress recorded), so the test can kill it between layers 1 and 2.
"""

from __future__ import annotations

import os
import sys
import time

from kompakt.model.stream_save import LayerStream
from kompakt.recipe.runner import run_recipe
from kompakt.recipe.schema import Recipe

pause = float(os.environ.get("KOMPAKT_TEST_LAYER_PAUSE", "0"))
if pause:
    written = LayerStream.write_layer

    def write_layer(self, index, *args, **kwargs):
        written(self, index, *args, **kwargs)
        if index == 1:
            time.sleep(pause)

    LayerStream.write_layer = write_layer  # type: ignore[method-assign]

run_recipe(Recipe.from_file(sys.argv[1]), sys.argv[2], max_memory=sys.argv[3])
