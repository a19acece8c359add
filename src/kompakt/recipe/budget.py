"""The memory and time plan of a recipe: what each step is predicted to hold at its peak and how
long it takes, from the model's shapes (safetensors headers, no weight read) and the recipe's
calibration size, checked against `--max-memory` before any work.

    estimates = plan_memory(recipe, max_memory="6GB")    # ConfigError when a step cannot fit
    for e in estimates: print(e.line())

The run streams (every step one decoder layer at a time) exactly when the runner would
(kompakt.recipe.stream_step.must_stream: the fp32 model and its calibration working memory do
not fit the budget); then a pass that needs the whole model is refused as the runner refuses it,
and a budget that cannot hold one layer plus its activations is a one-line error
(kompakt.calib.memory_plan.check_budget). The arithmetic is in kompakt.calib.memory_plan.
"""

from __future__ import annotations

import torch

from kompakt.calib.gpu_plan import estimate_gpu_step
from kompakt.calib.memory_plan import ModelShapes, StepEstimate, check_budget, estimate_step, measure_flops
from kompakt.recipe.schema import Recipe
from kompakt.units import parse_memory

# Passes that accumulate an in x in Hessian per Linear group (GPTQ; SparseGPT inside prune.sparse).
HESSIAN_PASSES = ("quant.gptq", "prune.sparse")


def plan_memory(recipe: Recipe, max_memory: int | str | None = None, *, check: bool = True,
                dtype: torch.dtype | None = None, max_gpu_memory: int | str | None = None) -> list[StepEstimate]:  # fmt: skip
    """One StepEstimate per step of `recipe` (module docstring); with `check`, ConfigError when
    a step does not fit the budget even streamed, or needs the whole model and the run streams.
    Streamed steps on a GPU (the command's --device, kompakt.model.device) are estimated as
    kompakt.calib.gpu_plan predicts them, and checked against `max_gpu_memory` too."""
    from kompakt.model.lazy import open_lazy
    from kompakt.model.load import resolve_model
    from kompakt.recipe.stream_step import must_spill, must_stream, refuse_unstreamable

    budget = parse_memory(max_memory)
    directory, name = resolve_model(recipe.model)
    lazy = open_lazy(directory, name=name)
    shapes = ModelShapes.from_lazy(lazy)
    dtype = dtype or lazy.compute_dtype  # what the run computes in (a bf16 checkpoint on a bf16 CPU: bf16)
    flops = measure_flops(dtype)
    # The runner's own rule (kompakt.recipe.stream_run): the whole run streams or none of it.
    streamed = must_stream(lazy, budget, recipe.data.calibration_blocks * recipe.data.block_len)
    estimates = []
    for index, step in enumerate(recipe.steps, 1):
        spec, config = step.spec_and_config()
        if streamed and check:
            refuse_unstreamable(spec, lazy, budget)  # type: ignore[arg-type]
        tokens = recipe.data.calibration_blocks * recipe.data.block_len
        label = f"{index} {step.name}"
        if streamed and spec.streams and lazy.device.type != "cpu":  # layers onloaded to the GPU
            estimates.append(estimate_gpu_step(label, shapes, tokens=tokens if spec.uses_calibration(config) else 0,
                                               hessians=step.name in HESSIAN_PASSES, compute=lazy.compute_dtype,
                                               stored=lazy.storage_dtype))  # fmt: skip
            continue
        estimates.append(_estimate(label, spec.uses_calibration(config), step.name, recipe, shapes,
                                   streamed and spec.streams, dtype, lazy.storage_dtype, flops,
                                   must_spill(lazy, budget, tokens), getattr(config, "batch_size", 8)))  # fmt: skip
    if check:
        check_budget(estimates, budget)
        check_budget(estimates, parse_memory(max_gpu_memory), gpu=True)
    return estimates


def _estimate(label: str, calibrates: bool, name: str, recipe: Recipe, shapes: ModelShapes, streamed: bool,
              dtype: torch.dtype, stored: torch.dtype, flops: float, spilled: bool, batch: int) -> StepEstimate:  # fmt: skip
    tokens = recipe.data.calibration_blocks * recipe.data.block_len if calibrates else 0
    return estimate_step(label, shapes, tokens=tokens, seq_len=recipe.data.block_len, streamed=streamed,
                         hessians=name in HESSIAN_PASSES, dtype=dtype, stored=stored, flops=flops,
                         spilled=streamed and spilled, batch=batch)  # fmt: skip
