"""Per-tensor GGUF types in a quant step (`tensor_types`), resolved on the model before any work.

The recipe contract every quant step shares (quant.rtn, quant.gptq, quant.awq, quant.qat)::

    - quant.gptq:
        format: q4_0                                   # the default type
        tensor_types:
          model.layers.*.mlp.down_proj: q5_0           # fnmatch pattern over module names
          model.layers.0.self_attn.v_proj: q8_0        # an exact name wins over any pattern
          model.embed_tokens: q5_0                     # rounded to it too (llama.cpp's rounding)

Keys are HF module names or fnmatch patterns over the modules the step quantizes, plus the
embedding and the output head: a quantized type there has the step round that matrix with
llama.cpp's reference rounding (as `embeddings` / `lm_head` do), so what the step measures is
what the GGUF holds, and the export writes it in that type; a tied pair is one decision, keyed
by the embedding (`lm_head` on a tied model means the same). An exact name
beats a pattern; among patterns, the first listed that matches wins (as llama-quantize's
`--tensor-type`). A float type (f16, bf16, f32) keeps a Linear unquantized and written in it.

Everything a user can get wrong fails here with one ConfigError line, before a weight moves:
an unknown type, a key that matches nothing, a type the row length cannot take ("rows of 576
are not a multiple of 256").

Grids: the 32-weight block types of kompakt.ops.gguf_grid are GGUFBlockGrid; the K-quants are
kompakt.ops.ggml_kquant_grid.KQuantGrid(name), whose `pack(codes, stored)` gives the file bytes
GPTQ chose (they cannot be recovered from the dense weights, so they travel as
LoadedModel.gguf_blocks); RTN of any type is llama.cpp's reference quantizer
(kompakt.ops.ggml_types.quantize).
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, embeddings_tied, get_submodule
from kompakt.ops.ggml_types import FLOAT_TYPES, NAMES, ggml_type
from kompakt.ops.ggml_kquant_grid import KQuantGrid
from kompakt.ops.gguf_grid import FORMATS, GGUFBlockGrid


def gguf_grid(name: str) -> Any:
    """The grid a weight of GGUF type `name` is quantized on (GPTQ's, AWQ's search, QAT's forward)."""
    if name in FORMATS:
        return GGUFBlockGrid(name)
    return KQuantGrid(name)


def check_type(name: str, what: str) -> str:
    """`name` lower-cased if this step can quantize to it; ConfigError (one line) otherwise."""
    key = str(name).lower()
    if key not in NAMES:
        raise ConfigError(f"{what}: unknown GGUF type {name!r}; choose one of {', '.join(NAMES)}")
    if key in FLOAT_TYPES:
        return key

    return key


def check_tensor_types(tensor_types: Any, fmt: str | None, what: str) -> dict[str, str] | None:
    """The `tensor_types` option validated without a model (types, shape of the mapping); the row
    lengths are checked on the model (`resolve_types`)."""
    if not tensor_types:
        return None
    if not isinstance(tensor_types, Mapping):
        raise ConfigError(f"{what}: tensor_types must map module names or patterns to GGUF types")
    if fmt is None:
        raise ConfigError(f"{what}: tensor_types needs `format`, the GGUF type of every other module (e.g. q4_0)")
    return {str(key): check_type(value, f"{what}: tensor_types {key}") for key, value in tensor_types.items()}


def _heads(model: nn.Module) -> dict[str, int]:
    """Embedding (and untied output head) name -> row length: keys that only set the export type."""
    spec = arch_for(model)
    heads = {spec.embed: int(get_submodule(model, spec.embed).weight.shape[1])}
    if spec.lm_head is not None and not embeddings_tied(model):  # an encoder has no output head
        heads[spec.lm_head] = int(get_submodule(model, spec.lm_head).weight.shape[1])
    return heads


def resolve_types(model: nn.Module, tensor_types: Mapping[str, str] | None, targets: Mapping[str, int],
                  default: str, what: str) -> dict[str, str]:  # fmt: skip
    """Module -> GGUF type for every target (`targets`: name -> row length) and for the head keys
    given; ConfigError before any work for a key that matches nothing or a type a row cannot take.

    A target whose row the *default* type cannot take is left out (the step leaves it
    unquantized and says so, as before per-tensor types).
    """
    spec = arch_for(model)
    heads = _heads(model)
    rows = {**heads, **targets}
    tied = spec.lm_head not in heads
    chosen: dict[str, str] = {}
    items = sorted((tensor_types or {}).items(), key=lambda kv: kv[0] not in rows)  # exact names first
    for key, ttype in items:
        name = spec.embed if tied and key == spec.lm_head else key
        matched = [n for n in rows if n == name or fnmatchcase(n, name)]
        if not matched:
            example = next(iter(targets), spec.embed)
            raise ConfigError(f"{what}: tensor_types key {key!r} matches no module this step quantizes nor the "
                              f"embedding / output head (names look like {example!r})")  # fmt: skip
        if tied and key == spec.lm_head and chosen.get(name, ttype) != ttype:
            raise ConfigError(f"{what}: the embedding and lm_head are one tied tensor; give it one type, not two")
        for module in matched:
            chosen.setdefault(module, ttype)
    for module, ttype in chosen.items():
        t = ggml_type(ttype)
        if not t.fits(rows[module]):
            raise ConfigError(f"{what}: {module}={ttype}: rows of {rows[module]} are not a multiple of {t.block}; "
                              "choose a type with smaller blocks for it")  # fmt: skip
    for module, cols in targets.items():
        if module not in chosen and ggml_type(default).fits(cols):
            chosen[module] = default
    return chosen


def types_label(fmt: str, tensor_types: Mapping[str, str] | None) -> str:
    """The grid label of a mixed step, which AWQ and the quantizer after it compare: a few keys in
    full ("q4_0 + *.down_proj=q8_0"), many as counts per type plus a digest of the whole map
    ("iq4_nl + 73 typed: 45 q4_1, 25 q3_k, 3 q4_k #1a2b3c4d"), so summaries stay one short line."""
    if not tensor_types:
        return fmt
    if len(tensor_types) <= 4:
        return fmt + " + " + ", ".join(f"{k}={v}" for k, v in tensor_types.items())
    import hashlib
    import json
    from collections import Counter

    counts = ", ".join(f"{n} {t}" for t, n in Counter(tensor_types.values()).most_common())
    digest = hashlib.sha256(json.dumps(dict(tensor_types), sort_keys=True).encode()).hexdigest()[:8]
    return f"{fmt} + {len(tensor_types)} typed: {counts} #{digest}"
