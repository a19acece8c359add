"""What export does with factorized Linears (lowrank.svd) and shared layers (share.layers):
refuse, or `--merge` them back to dense.

Neither runtime an export targets has such a layer: llama.cpp's GGUF architectures name one
weight per projection, and transformers would need remote code to rebuild `...q_proj.0` /
`...q_proj.1` (kompakt loads them with its own modules; a plain HF directory must load in plain
transformers, or it is not worth exporting). So both GGUF and HF exports refuse a factorized
model in one line naming `--merge`, and with `--merge` write the dense equivalent B·A, saying the
result is back to full size. The caller's model is not changed (the merge works on a copy).
Layers that share weights are the same story: no format here stores a tie, so they are refused,
or with `--merge` each depth gets its own dense weight (kompakt.model.sharing.merged_dense).

Merged weights are the products of the factors, not on any grid the factors were quantized to:
the merged modules leave the recorded quantization, per-tensor types and exact GGUF bytes, so the
export writes them at its `--type` like any dense weight (and says so).
"""

from __future__ import annotations

import copy
import dataclasses

from kompakt.errors import ConfigError
from kompakt.model.compression import get_state, update_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.lowrank import merge_lowrank
from kompakt.model.sharing import is_shared, merged_dense, refuse_shared

RUNTIMES = {"gguf": "llama.cpp has no factorized-Linear layer", "ollama": "llama.cpp has no factorized-Linear layer",
            "hf": "transformers cannot load factorized Linears without remote code"}  # fmt: skip


def dense_for_export(loaded: LoadedModel, format: str, merge: bool) -> tuple[LoadedModel, list[str]]:
    """`loaded` itself when it has no factorized Linears or shared layers; else its merged copy
    and notes (with `merge`) or a ConfigError naming --merge."""
    loaded, notes = _unshared(loaded, format, merge)
    factorized = get_state(loaded).lowrank
    if not factorized:
        return loaded, notes
    if not merge:
        raise ConfigError(f"{loaded.name} has {len(factorized)} factorized Linears (lowrank.svd) and "
                          f"{RUNTIMES.get(format, RUNTIMES['gguf'])}; pass --merge to write the dense equivalent "
                          "(back to full size)")  # fmt: skip
    model = copy.deepcopy(loaded.model)
    names = merge_lowrank(model)
    factors = {f"{name}.{i}" for name in names for i in (0, 1)}
    _forget(model, factors)
    blocks = {name: b for name, b in loaded.gguf_blocks.items() if name not in factors}
    merged = dataclasses.replace(loaded, model=model, gguf_blocks=blocks, _fingerprint=None)
    params = merged.num_parameters()
    note = (f"--merge: {len(names)} factorized Linears written as their dense product B·A; the file is back to "
            f"full size ({params:,} parameters, {loaded.num_parameters():,} factorized)")  # fmt: skip
    return merged, [*notes, note]


def _unshared(loaded: LoadedModel, format: str, merge: bool) -> tuple[LoadedModel, list[str]]:
    if not merge:
        refuse_shared(loaded, f"a {format} export")
    if not is_shared(loaded):
        return loaded, []
    dense = merged_dense(loaded)
    return dense, [f"--merge: the shared layers are written dense, {dense.num_parameters() / 1e6:.1f} M parameters "
                   f"instead of the shared model's {loaded.num_parameters() / 1e6:.1f} M (full size again)"]  # fmt: skip


def _forget(model, factors: set[str]) -> None:
    """Drop the merged factors from the recorded grid and per-tensor types (no longer on them)."""
    state = get_state(model)
    quantization = state.quantization
    if quantization is not None:
        kept = tuple(m for m in quantization.modules if m not in factors)
        groups = {m: g for m, g in quantization.group_sizes.items() if m not in factors}
        quantization = dataclasses.replace(quantization, modules=kept, group_sizes=groups) if kept else None
    types = {m: t for m, t in state.per_tensor_types.items() if m not in factors}
    update_state(model, quantization=quantization, per_tensor_types=types)
