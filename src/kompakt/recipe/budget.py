"""The memory and time plan of a recipe: what each step is predicted to hold at its peak and how
long it takes, from the model's shapes (safetensors headers, no weight read) and the recipe's
calibration size, checked against `--max-memory` before any work.

    estimates = plan_memory(recipe, max_memory="6GB")    # ConfigError when a step cannot fit
    for e in estimates: print(e.line())

A step runs in memory when the whole model and its working memory fit the budget (or no budget is
given), else streamed one decoder layer at a time when its pass can (PassSpec.streams, the
streaming driver of kompakt.calib); a pass that needs the whole model (training, structural
edits) is estimated in memory, and a budget that holds neither is a one-line error
(kompakt.calib.memory_plan.check_budget). The arithmetic is in kompakt.calib.memory_plan.
"""

from __future__ import annotations

from typing import Any

import torch

from kompakt.calib.memory_plan import ModelShapes, StepEstimate, check_budget, estimate_step, measure_flops
from kompakt.errors import ConfigError
from kompakt.recipe.schema import Recipe
from kompakt.units import parse_size

# Passes that accumulate an in x in Hessian per Linear group (GPTQ; SparseGPT inside prune.sparse).
HESSIAN_PASSES = ("quant.gptq", "prune.sparse")


def parse_budget(max_memory: int | str | None, flag: str = "--max-memory") -> int | None:
    """Bytes of `--max-memory` ("6GB", "512MiB", a number of bytes); None stays None."""
    if max_memory is None:
        return None
    try:
        return parse_size(max_memory, flag)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def plan_memory(recipe: Recipe, max_memory: int | str | None = None, *, check: bool = True,
                dtype: torch.dtype = torch.float32) -> list[StepEstimate]:  # fmt: skip
    """One StepEstimate per step of `recipe` (module docstring); with `check`, ConfigError when
    a step does not fit the budget even streamed."""
    from kompakt.model.lazy import open_lazy
    from kompakt.model.load import resolve_model

    budget = parse_budget(max_memory)
    directory, name = resolve_model(recipe.model)
    lazy = open_lazy(directory, name=name)
    shapes = ModelShapes.from_lazy(lazy)
    flops = measure_flops(dtype)
    estimates = [_estimate(index, step, recipe, shapes, budget, dtype, lazy.storage_dtype, flops)
                 for index, step in enumerate(recipe.steps, 1)]  # fmt: skip
    if check:
        check_budget(estimates, budget)
    return estimates


def _estimate(index: int, step: Any, recipe: Recipe, shapes: ModelShapes, budget: int | None,
              dtype: torch.dtype, stored: torch.dtype, flops: float) -> StepEstimate:  # fmt: skip
    spec, _ = step.spec_and_config()
    tokens = recipe.data.calibration_blocks * recipe.data.block_len if spec.needs_calibration else 0
    common = dict(tokens=tokens, seq_len=recipe.data.block_len, hessians=step.name in HESSIAN_PASSES,
                  dtype=dtype, stored=stored, flops=flops)  # fmt: skip
    label = f"{index} {step.name}"
    whole = estimate_step(label, shapes, streamed=False, **common)
    if budget is None or whole.peak_bytes <= budget or not getattr(spec, "streams", False):
        return whole
    return estimate_step(label, shapes, streamed=True, **common)
