"""The candidates that reach a speed target (`--target params=0.5,speed=2x`): measured, not counted.

Speed is a property of the shape, not of the weights, so each shape is timed before anything is
cut: a model of that shape with random weights is written as an f16 GGUF and run by llama.cpp
(kompakt.auto.search.latency, cached per shape), against the original's shape timed the same
way. `speed` is the factor on generation tokens/s, the number a laptop user waits on.

Shapes are tried in the search's spread order (one of each kind of cut first). A shape is skipped
without timing when a shape already found too slow is no larger in any dimension (same or fewer
layers, hidden, MLP and KV groups): more of every matmul cannot be faster. At most
`MEASURE_PER_CANDIDATE` x the wanted count are timed, so an unreachable factor costs minutes,
not hours, and ends in a one-line refusal naming the fastest shape measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kompakt.auto.search.shapes import Origin, Shape, describe, reshaped_config
from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

MEASURE_PER_CANDIDATE = 3
Measure = Callable[[LoadedModel], dict]


def shape_model(original: LoadedModel, origin: Origin, shape: Shape, intermediate_key: str) -> LoadedModel:
    """A model of `shape` with random weights and the original's tokenizer: only for timing."""
    from transformers import AutoModelForCausalLM

    config = reshaped_config(original.model.config, origin, intermediate_key, shape.layers, shape.hidden,
                             shape.intermediate, shape.kv_groups)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    return LoadedModel(model=model, tokenizer=original.tokenizer, name=f"shape {shape.key}")


def _no_larger(a: Shape, b: Shape) -> bool:
    """Every dimension of `a` is at most `b`'s: `a` cannot be slower than `b`."""
    return all(x <= y for x, y in zip(a.key, b.key))


def _tps(measured: dict, what: str) -> float:
    if "error" in measured or not measured.get("generate_tps"):
        raise ConfigError(f"--target speed= needs llama.cpp's measured speed and {what} could not be timed "
                          f"({measured.get('error', 'no generation speed')}); install llama-cpp-python or drop speed=")  # fmt: skip
    return float(measured["generate_tps"])


def fast_enough(original: LoadedModel, origin: Origin, ordered: list[Shape], count: int, factor: float,
                intermediate_key: str, measure: Measure) -> tuple[list[Shape], dict[tuple, dict], float]:  # fmt: skip
    """Up to `count` shapes of `ordered` whose measured generation speed is at least `factor` x
    the original's: (shapes, shape key -> measured latency with its `speedup`, the original's
    generation tokens/s). ConfigError when none of the timed shapes reaches the factor."""
    base = _tps(measure(original), "the original")
    chosen: list[Shape] = []
    timed: dict[tuple, dict] = {}
    too_slow: list[Shape] = []
    for shape in ordered:
        if len(chosen) == count or len(timed) >= MEASURE_PER_CANDIDATE * count:
            break
        if any(_no_larger(slow, shape) for slow in too_slow):
            continue
        measured = measure(shape_model(original, origin, shape, intermediate_key))
        latency = {**measured, "speedup": round(_tps(measured, describe(origin, shape)) / base, 3)}
        timed[shape.key] = latency
        logger.info("search: %s generates %.2fx the original's tokens/s", describe(origin, shape), latency["speedup"])
        (chosen if latency["speedup"] >= factor else too_slow).append(shape)
    if not chosen:
        best = max(timed.items(), key=lambda item: item[1]["speedup"], default=None)
        fastest = next((s for s in too_slow if best and s.key == best[0]), None)
        said = f"; the fastest of {len(timed)} timed is {best[1]['speedup']:.2f}x ({describe(origin, fastest)})" if fastest else ""
        raise ConfigError(f"no shape at this params= target reaches speed={factor:g}x in llama.cpp on this machine{said}; "
                          "ask for a lower speed= or a smaller params=")  # fmt: skip
    return chosen, timed, base
