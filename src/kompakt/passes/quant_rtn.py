"""Round-to-nearest weight quantization (RTN): every weight to the nearest point of a grid.

The baseline of every post-training quantization paper (e.g. Dettmers et al. 2022,
"LLM.int8()"; Frantar et al. 2022, "GPTQ", Table 1). No data, under a second on a 135M model.
Use it at 8 bits (nearly lossless), as the fast baseline at 4 bits, or after `quant.awq`
(activation-aware scaling makes RTN competitive). At 4 bits and below `quant.gptq` is better.

Grids and modules are those every quant pass shares (kompakt.passes.quant_common): integer
grids (`bits`, `group_size`, `symmetric`) or `format:` a GGUF type (q4_0, q8_0, q5_0, q4_k, ...),
where RTN is bit-exact llama.cpp's reference quantizer, so `kompakt export --type` of the same
format writes the values without re-rounding; `tensor_types` gives modules their own GGUF types
(kompakt.passes.quant_types). `embeddings: true` / `lm_head: true` also quantize those.

What the pass leaves: the weights hold the exact dequantized values (fp32), the compression
state (kompakt.model.compression) records the grid and its modules (it survives save ->
reload; GGUF export and the refusal to quantize twice read it), and the report carries the
packed layers (codes and fp16 scales exactly as quantized), so the recipe runner stores the
step packed (compressed-tensors).

Sample recipe steps::

    - quant.rtn: {bits: 4, group_size: 64}
    - quant.rtn: {bits: 8, group_size: null}
    - quant.rtn: {format: q4_0}
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kompakt.passes.base import PassContext, PassReport, PassSpec
from kompakt.passes.streaming import each_layer, materialize_targets
from kompakt.passes.quant_common import (
    QuantGridConfig,
    Quantized,
    Target,
    grid_counts,
    notes_of,
    prepare,
    record,
    rtn_targets,
    select_targets,
    summary_line,
    target_types,
)


@dataclass
class RtnConfig(QuantGridConfig):
    def validate(self) -> None:
        self.validate_grid("quant.rtn")


def _streamed(ctx: PassContext, targets: list[Target], config: RtnConfig, types: dict[str, str]) -> Quantized:
    """RTN of a streamed model (larger than memory): layer by layer, each written and released
    before the next is read; then the embeddings / head when asked (written at the stream's end)."""
    done = Quantized()

    def one(index: int, layer) -> None:
        done.update(rtn_targets([t for t in targets if t.layer == index], config, types))

    each_layer(ctx, one, done)
    rest = [t for t in targets if t.layer is None]
    materialize_targets(ctx, [t.module for t in rest])
    done.update(rtn_targets(rest, config, types))
    return done


def apply(ctx: PassContext, config: RtnConfig) -> PassReport:
    start = time.perf_counter()
    loaded = prepare(ctx, "quant.rtn", config)
    targets = select_targets(loaded.model, config, "quant.rtn")
    types = target_types(loaded.model, config, targets, "quant.rtn")
    quantized = _streamed(ctx, targets, config, types) if ctx.stream else rtn_targets(targets, config, types)
    packed_layers = record(loaded, "rtn", config, quantized, types)
    done = quantized.plans
    notes = notes_of(done, "quant.rtn")
    details = {"method": "rtn", "grid": config.grid_label, "modules": len(done), "grids": grid_counts(config, done),
               "notes": notes, "seconds": time.perf_counter() - start}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary_line("rtn", config, done, notes), details=details,
                      packed_layers=packed_layers)  # fmt: skip


PASS = PassSpec(name="quant.rtn", config=RtnConfig, apply=apply, streams=True, doc=__doc__ or "")
