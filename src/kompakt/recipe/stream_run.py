"""The recipe runner's streamed mode: a model larger than `--max-memory`, never loaded whole.

`run_recipe(..., max_memory="6GB")` asks `streamed_original` first: it opens the recipe's model
lazily (config and safetensors headers only) and, when the model in fp32 plus the calibration
working memory exceeds the budget (kompakt.recipe.stream_step.must_stream), returns the model's
skeleton; the run then goes on as usual except that

- every step is checked before any work: a pass that is not streamable (training, structural
  edits) is refused in one line naming the ways out, and so is a run without calibration text
  (the model cannot generate its own when it cannot be loaded);
- each step runs through `kompakt.recipe.stream_step.streamed_step` (one decoder layer in memory
  at a time, the result written shard by shard) and the next step opens its output lazily
  (a packed quantized result too: kompakt.model.lazy dequantizes it as kompakt.load does);
- the step hashes start from `LazyModel.fingerprint` (headers and first rows, no full read);
- the steps are not evaluated (`SizeMeasurer`: parameters and bytes only; metrics are empty,
  so quality gates do not fire). Evaluate the result with `kompakt eval`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kompakt.errors import ConfigError
from kompakt.model.arch import is_encoder_family
from kompakt.model.hf_dir import read_config
from kompakt.model.lazy import LazyModel, lazy_of, open_lazy
from kompakt.model.loaded import LoadedModel
from kompakt.recipe.schema import Recipe
from kompakt.recipe.stream_step import must_stream, refuse_unstreamable
from kompakt.units import parse_memory

logger = logging.getLogger(__name__)


def lazy_loaded(directory: Path, name: str | None = None) -> LoadedModel:
    """The skeleton of the model at `directory` as a LoadedModel (nothing read but headers),
    with its fingerprint set from the headers so the runner never reads the weights for it."""
    lazy = open_lazy(directory, name=name)
    loaded = lazy.loaded()
    loaded._fingerprint = lazy.fingerprint()
    return loaded


def streamed_original(recipe: Recipe, max_memory: int | str | None) -> LoadedModel | None:
    """The recipe's original as a lazy skeleton when the run must stream under `max_memory`, else
    None (the in-memory run). Raises ConfigError for what a streamed run cannot do, before any work."""
    from kompakt.model.load import _resolve

    budget = parse_memory(max_memory)
    if budget is None:
        return None
    directory, name = _resolve(recipe.model)
    if is_encoder_family(read_config(directory)):
        logger.info("%s is a sentence encoder: it runs in memory (only causal LMs stream)", name)
        return None
    lazy = open_lazy(directory, name=name)
    tokens = recipe.data.calibration_blocks * recipe.data.block_len
    if not must_stream(lazy, budget, tokens):
        logger.info("%s fits in --max-memory %.1f GB: running in memory", name, budget / 1e9)
        return None
    steps = [step.spec_and_config() for step in recipe.steps]
    for spec, _ in steps:
        refuse_unstreamable(spec, lazy, budget)
    if recipe.data.calibration is None and any(spec.uses_calibration(config) for spec, config in steps):
        raise ConfigError(f"{name} does not fit in --max-memory {budget / 1e9:.1f} GB, so it cannot generate its own "
                          "calibration text; pass calibration text with --data")  # fmt: skip
    logger.info("%s needs more than --max-memory %.1f GB: every step streams one layer at a time", name, budget / 1e9)
    return lazy_loaded(directory, name)


def streamed_input(loaded: LoadedModel) -> LazyModel | None:
    """The LazyModel behind a step's input when the run streams (None in memory)."""
    return lazy_of(loaded.model)


class SizeMeasurer:
    """The streamed run's measurer: sizes from the headers and the disk, no evaluation."""

    def __init__(self, original: LoadedModel) -> None:
        self.original = original

    def baseline(self) -> dict[str, Any]:
        from kompakt.evaluate import disk_bytes

        return {"parameters": self.original.num_parameters(), "bytes": disk_bytes(self.original.path),
                "metrics": {}}  # fmt: skip

    def measure(self, candidate: LoadedModel) -> dict[str, Any]:
        logger.info("%s: not evaluated (streamed run); evaluate the result with kompakt eval", candidate.name)
        return {}
