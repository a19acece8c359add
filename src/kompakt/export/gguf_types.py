"""Which GGUF type each tensor of an export gets, and how to say so in one line.

Highest first:

1. `--tensor-type PATTERN=TYPE` (repeatable): PATTERN is a regex searched in the GGUF tensor
   name, as llama-quantize's `--tensor-type` (`ffn_down=q5_0`, `blk\\.[0-3]\\.attn_v=q8_0`,
   `token_embd=q4_0`), or in the HF weight name (`model.layers.0.mlp.down_proj=q8_0`; `lm_head`
   also names a tied embedding); the first pattern that matches wins.
2. The model's per-tensor types (CompressionState.per_tensor_types: what a quant step with
   `tensor_types` chose, or an allocation).
3. `--type`, with llama.cpp's own rules (llama-quant.cpp, no imatrix, not --pure): the output
   tensor (output.weight, or token_embd when tied) is Q6_K when its rows are a multiple of 256
   and Q8_0 otherwise (Q8_0 stays Q8_0, float types stay float); a type whose block does not
   divide a row falls back as llama.cpp does (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0,
   q2_k / q3_k -> q4_0, then F16 when even that does not fit), reported per tensor.

A type forced by 1. that a row cannot take, an unknown type, a pattern that matches no tensor,
or a type kompakt cannot write yet is a ConfigError before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


from kompakt.errors import ConfigError
from kompakt.ops.ggml_types import FLOAT_TYPES, NAMES, ggml_type

OUTPUT_BLOCK = 256  # Q6_K's super-block: llama.cpp's output tensor rule
# The llama.cpp file type (gguf.LlamaFileType member) of a file whose weights are mostly of a type.
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q6_k": "MOSTLY_Q6_K", "q5_1": "MOSTLY_Q5_1", "q5_k": "MOSTLY_Q5_K_M", "q5_0": "MOSTLY_Q5_0",
              "q4_1": "MOSTLY_Q4_1", "q4_k": "MOSTLY_Q4_K_M", "iq4_nl": "MOSTLY_IQ4_NL", "q4_0": "MOSTLY_Q4_0",
              "q3_k": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K"}  # fmt: skip
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


@dataclass(frozen=True)
class Override:
    """One `--tensor-type PATTERN=TYPE`."""

    pattern: str
    type: str

    def matches(self, names: Iterable[str]) -> bool:
        return any(re.search(self.pattern, name) for name in names)


def parse_overrides(items: Iterable[str] | None) -> list[Override]:
    """`PATTERN=TYPE` strings as Overrides; ConfigError (one line) for a malformed one."""
    result = []
    for item in items or ():
        pattern, sep, ttype = str(item).rpartition("=")
        if not sep or not pattern or not ttype:
            raise ConfigError(f"--tensor-type {item!r}: write PATTERN=TYPE, e.g. ffn_down=q5_0")
        if ttype.lower() not in NAMES:
            raise ConfigError(f"--tensor-type {item!r}: unknown GGUF type {ttype!r}; choose one of {', '.join(NAMES)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--tensor-type {item!r}: {pattern!r} is no regular expression ({exc})") from None
        result.append(Override(pattern, ttype.lower()))
    return result


def fallback(ttype: str, cols: int) -> str:
    """llama.cpp's type for a row of `cols` that `ttype`'s block does not divide (itself when it does)."""
    if ggml_type(ttype).fits(cols):
        return ttype
    other = _FALLBACK.get(ttype, ttype)
    return other if ggml_type(other).fits(cols) else "f16"


@dataclass
class TypeChooser:
    """Chooses each 2-D tensor's type (module docstring); `notes` says where a rule changed one."""

    default: str
    overrides: list[Override] = field(default_factory=list)
    model_types: Mapping[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _used: set[int] = field(default_factory=set)

    def choose(self, gguf_name: str, names: tuple[str, ...], module: str, cols: int, is_output: bool) -> str:
        """The type of a 2-D tensor: `names` are what overrides search (GGUF and HF names),
        `module` is the key of the model's per-tensor types."""
        for index, override in enumerate(self.overrides):
            if override.matches(names):
                self._used.add(index)
                t = ggml_type(override.type)
                if not t.fits(cols):
                    raise ConfigError(f"--tensor-type {override.pattern}={override.type}: {gguf_name} has rows of "
                                      f"{cols}, not a multiple of {t.block}; choose a type with smaller blocks")  # fmt: skip
                return override.type
        chosen = self.model_types.get(module)
        if chosen is not None:
            if not ggml_type(chosen).fits(cols):  # a later pass changed the shape
                new = fallback(chosen, cols)
                self.notes.append(f"{gguf_name}: {new.upper()} (the model's {chosen} does not fit rows of {cols})")
                return new
            return chosen
        return self._default(gguf_name, cols, is_output)

    def _default(self, gguf_name: str, cols: int, is_output: bool) -> str:
        if self.default in FLOAT_TYPES:
            return self.default
        if is_output:
            if self.default == "q8_0" or cols % OUTPUT_BLOCK:
                return fallback("q8_0", cols)
            return "q6_k"
        new = fallback(self.default, cols)
        if new != self.default:
            block = ggml_type(self.default).block
            self.notes.append(f"{gguf_name}: {new.upper()} (rows of {cols} are not a multiple of {block}, "
                              "as llama.cpp falls back)")  # fmt: skip
        return new

    def check_used(self) -> None:
        """ConfigError for an override that matched no weight tensor (a typo would silently do nothing)."""
        for index, override in enumerate(self.overrides):
            if index not in self._used:
                raise ConfigError(f"--tensor-type {override.pattern}={override.type} matches no weight tensor "
                                  "(GGUF names look like blk.0.ffn_down.weight, token_embd.weight)")  # fmt: skip


def main_type(weights: Mapping[str, int]) -> str:
    """The type holding most weights (type -> number of weights): the file type llama.cpp names."""
    return max(weights.items(), key=lambda kv: (kv[1], kv[0]))[0]


def summarize(types: Iterable[tuple[str, str]]) -> str:
    """(GGUF name, type) of the weight tensors as one line: the most common type as a count, the
    others by name with layer ranges, e.g. "q4_0: 180 tensors; q6_k: blk.0-3.ffn_down; q5_0: token_embd"."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for name, ttype in types:
        by_type[ttype].append(name.removesuffix(".weight"))
    if not by_type:
        return ""
    counts = Counter({t: len(n) for t, n in by_type.items()})
    common = counts.most_common(1)[0][0]
    parts = [f"{common}: {counts[common]} tensors"]
    for ttype in sorted(by_type, key=lambda t: (-counts[t], t)):
        if ttype != common:
            parts.append(f"{ttype}: {_names(by_type[ttype])}")
    return "; ".join(parts)


def _names(names: list[str]) -> str:
    """blk.0.ffn_down, blk.1.ffn_down, blk.3.ffn_down -> "blk.0-1,3.ffn_down"."""
    layers: dict[str, list[int]] = defaultdict(list)
    others = []
    for name in names:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if match:
            layers[match.group(2)].append(int(match.group(1)))
        else:
            others.append(name)
    parts = [f"blk.{_ranges(sorted(ids))}.{suffix}" for suffix, ids in sorted(layers.items())]
    return ", ".join(others + parts)


def _ranges(ids: list[int]) -> str:
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
