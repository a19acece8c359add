"""What a pass does differently when its model is streamed (larger than the memory budget).

Not a pass. When the runner streams a step (kompakt.recipe.stream_step), `ctx.loaded` is the
skeleton of a lazily opened model (kompakt.model.lazy) and `ctx.stream` the LayerStream that
writes the result shard by shard (kompakt.model.stream_save). A pass that declares
`PassSpec.streams` then:

- hands `layer_writer(ctx, done)` to `kompakt.calib.run_sequential` as `on_layer` (calibration
  passes), or walks the layers with `each_layer(ctx, fn)` (RTN): each decoder layer is
  materialised, changed, written and released before the next one;
- calls `materialize_targets(ctx, targets)` before touching weights outside the decoder layers
  (embeddings, lm_head: they stay materialised until the stream's `finish` writes them).

Packed layers a quant pass produced for a written layer are taken out of `done.packed` there, so
the step's report carries only those of the modules written at `finish`. With no stream every
function here does nothing (`layer_writer` returns None), so a pass reads the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from kompakt.model.arch import decoder_layers
from kompakt.passes.base import PassContext

LayerFn = Callable[[int, nn.Module], None]


def layer_writer(ctx: PassContext, done: Any = None) -> LayerFn | None:
    """`on_layer` for run_sequential: store the finished layer through `ctx.stream` (None when not
    streamed). `done`: a quant pass's Quantized (plans and packed layers by module name)."""
    stream = ctx.stream
    if stream is None:
        return None

    def write(index: int, layer: nn.Module) -> None:
        prefix = stream.lazy.layer_path(index) + "."
        plans = {} if done is None else {n: p for n, p in done.plans.items() if n.startswith(prefix)}
        packed = {n: done.packed.pop(n) for n in plans if done.packed.get(n) is not None}
        exact = {n for n, plan in plans.items() if plan.grid is not None and n not in packed}
        if stream.resume is not None and done is not None and any(n.startswith(prefix) for n in done.blocks):
            stream.resume.decline()  # GGUF bytes kept beside the weights are not in the shards: no resuming
        stream.write_layer(index, layer, ctx.loaded, packed, exact)

    return write


def each_layer(ctx: PassContext, fn: LayerFn, done: Any = None) -> None:
    """Run `fn(index, layer)` on every decoder layer: streamed, each layer is materialised first,
    then written and released; in memory, simply in order."""
    write = layer_writer(ctx, done)
    lazy = None if ctx.stream is None else ctx.stream.lazy
    for index, layer in enumerate(decoder_layers(ctx.loaded.model)):
        if lazy is not None:  # onloaded to the command's --device, as the sequential driver does
            lazy.onload(layer)
        fn(index, layer)
        if write is not None and lazy is not None:
            write(index, layer)
            lazy.release(layer)


def materialize_targets(ctx: PassContext, modules: Iterable[nn.Module]) -> None:
    """Streamed: bring `modules` (outside the decoder layers) into memory before a pass changes
    them; they are written by the stream's `finish`. In memory: nothing to do."""
    if ctx.stream is None:
        return
    lazy = ctx.stream.lazy
    for module in modules:
        lazy.materialize(module, lazy.compute_dtype)
