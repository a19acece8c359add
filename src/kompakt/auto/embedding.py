"""Where the bytes of a model's file are when its layers are 4-bit: for a large vocabulary, in
the embedding. Gemma 3 270M: 262k x 640 tied embedding = 63 % of the parameters; with the
layers at Q4_0 and the embedding at Q8_0 (the GGUF export's rule for the output tensor, as
llama.cpp's quantizer keeps it at higher precision) it is 71 % of the file, and no number of
removed layers reaches 4x.

The planner states this in two lines, from the export's own tensor plan (ModelFacts.gguf_parts):
what the embedding holds and the type export writes it in (with the factor the other type
would give), and, when layer removal is asked to reach a size it cannot, what would reach it.
"""

from __future__ import annotations

import math

from kompakt.auto.facts import ModelFacts

MB = 1e6


def _gguf_embedding(facts: ModelFacts, fmt: str) -> tuple[int, int, str] | None:
    """(bytes now, bytes at Q4_0, what they are) of the embedding tensors in `fmt`'s file."""
    from kompakt.auto.gguf_bytes import tensor_bytes

    parts = facts.gguf_parts.get(fmt)
    if not parts or not parts.get("embedding_elements"):
        return None
    tied = parts["embedding_elements"] == facts.embedding_params
    what = (f"tied to the output, {parts['embedding_type'].upper()}" if tied
            else f"token_embd {parts['embedding_type'].upper()} + a separate output")  # fmt: skip
    return parts["embedding"], tensor_bytes((parts["embedding_elements"],), "q4_0"), what


def embedding_line(facts: ModelFacts, fmt: str) -> str | None:
    """What the embedding holds in `fmt`'s file and what the plan does about it (None when it
    is no GGUF type or the embedding is a small part)."""
    found = _gguf_embedding(facts, fmt)
    if found is None:
        return None
    now, as_q4, what = found
    total = facts.format_bytes[fmt]
    if now < 0.25 * total:
        return None
    share = facts.embedding_params / facts.params
    head = (f"embedding ({what}): {facts.embedding_params / 1e6:.0f} M of {facts.params / 1e6:.0f} M parameters "
            f"({share:.0%}), {now / MB:.0f} MB of the {total / MB:.0f} MB {fmt} file ({now / total:.0%})")  # fmt: skip
    if now <= as_q4:
        return f"{head}, written at Q4_0 with the layers"
    other = facts.fp16_bytes / (total - now + as_q4)
    return (
        f"{head}: the GGUF export keeps the output tensor at Q8_0 in every quantized file (as llama.cpp's "
        f"quantizer keeps it above 4 bits), so {fmt} gives {facts.size_factor(fmt):.2f}x; with the embedding at "
        f"Q4_0 ({as_q4 / MB:.0f} MB) the file would be {other:.2f}x, a type this export does not write for it — kept"
    )


def beyond_layers(facts: ModelFacts, fmt: str, factor: float) -> str | None:
    """Why removing layers cannot reach `factor` on top of `fmt`, and what would (None when
    removing fewer than all layers reaches it)."""
    needed = facts.fp16_bytes / factor
    fixed = facts.format_bytes[fmt] - facts.layer_bytes(fmt)  # what no layer removal touches
    if needed > fixed:
        return None
    head = (f"{factor:g}x ({needed / MB:.0f} MB) cannot come from removing layers: with all {facts.layers} "
            f"layers gone the {fmt} file would still hold {fixed / MB:.0f} MB")  # fmt: skip
    found = _gguf_embedding(facts, fmt)
    if found is None:
        return head
    now, as_q4, what = found
    head += f", {now / MB:.0f} MB of it the embedding ({what}) — the embedding, not the layers, holds the bytes"
    if now <= as_q4:
        return head
    rest = fixed - now + as_q4
    if needed <= rest:
        return head + f"; even at Q4_0 the embedding leaves {rest / MB:.0f} MB without any layer"
    layer_total = facts.layer_bytes(fmt)
    drop = math.ceil((facts.format_bytes[fmt] - now + as_q4 - needed) / layer_total * facts.layers - 1e-9)
    return head + f"; it would take the embedding at Q4_0 ({as_q4 / MB:.0f} MB, not written by this export) plus removing {drop} of {facts.layers} layers"
