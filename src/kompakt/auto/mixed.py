"""Mixed precision in the plan: the per-tensor allocation (kompakt.auto.allocate) on the
model's measured tensor costs (ModelFacts.tensors), turned into quantization steps and a line.

What is predicted: the decoder Linears are rounded by the attempt's pass (AWQ + GPTQ or GPTQ)
on their allocated grids, so they keep a share of the rounding KL (kompakt.auto.kept_share);
the embedding / output matrix is rounded with llama.cpp's reference rounding (by the GPTQ / RTN
step, so the measured KL is the file's), so it keeps all of its KL. The knapsack minimises that sum, and the bytes are the file's
(ModelFacts.gguf_fixed_bytes + each tensor in its type, aligned as the writer aligns).

Recipe contract (shared with the quant passes and the export): each quant step carries
`format` (the type most decoder Linears get) and `tensor_types` {module: type} for every tensor
that differs from it and for the embedding / output.
"""

from __future__ import annotations

import math
from collections import Counter

from kompakt.auto.allocate import Allocation, Decision, Option, within_bytes, within_kl
from kompakt.auto.facts import ModelFacts
from kompakt.auto.kept_share import kept_of_rtn
from kompakt.errors import ConfigError
from kompakt.ops.ggml_types import FLOAT_TYPES, QUANT_TYPES
from kompakt.recipe.schema import Step

MB = 1e6
AWQ_MAX_BLOCKS = 16
# Where the per-tensor types came from, as the GGUF metadata, the report and the card say.
SOURCE = ("allocation: per-tensor KL predicted as Fisher (the model's own predictions) x llama.cpp's "
          "rounding error, lowest total within the bytes (kompakt.auto.allocate)")
# The first attempt aims at this share of the KL floor: the prediction's error on the embedded
# models is ~10 % (tests/scoring/test_tensor_sensitivity.py), and crossing the floor costs a
# whole back-off attempt.
PREDICTION_MARGIN = 0.9


def is_layer(tensor: dict) -> bool:
    """Whether this tensor is a decoder-layer matrix, which GPTQ solves (the embedding / output
    is rounded plainly)."""
    return tensor["gguf_name"].startswith("blk.")


def wants_costs(target, facts: ModelFacts) -> bool:
    """Whether the plan for `target` allocates per tensor, so the run must measure the costs:
    a size / bytes / speed goal on a model the GGUF export can write."""
    return target.goal in ("size", "speed") and facts.gguf and bool(facts.tensors)


def has_costs(facts: ModelFacts) -> bool:
    """Whether the facts hold per-tensor costs to allocate from (a GGUF family, measured)."""
    return facts.gguf and bool(facts.tensors) and all(t.get("kl") for t in facts.tensors)


def decisions(facts: ModelFacts, method: str) -> list[Decision]:
    """One decision per tensor: its quantized types (f16 only where no quantized type fits its
    rows), with bytes and the KL the attempt is predicted to keep (on layers, the share of the
    rounding KL that `method`, e.g. "quant.awq+quant.gptq", keeps of an allocation)."""
    out, kept = [], kept_of_rtn(method, allocated=True)
    for tensor in facts.tensors:
        share = kept if is_layer(tensor) else 1.0
        types = _types(tensor["kl"])
        out.append(Decision(tensor["name"], [Option(t, tensor["bytes"][t], share * tensor["kl"][t]) for t in types]))
    return out


def _types(available: dict) -> list[str]:
    """The types a tensor may take: its quantized ones, or its float ones when none fits."""
    return [t for t in QUANT_TYPES if t in available] or [t for t in FLOAT_TYPES if t in available]


def smallest_file(facts: ModelFacts, fixed: int | None = None) -> int:
    """Bytes of the smallest GGUF file the types allow (every tensor in its smallest type; `fixed`:
    the bytes outside the matrices, default the header without type-source keys)."""
    return (facts.gguf_fixed_bytes if fixed is None else fixed) + sum(min(t["bytes"][x] for x in _types(t["bytes"])) for t in facts.tensors)


def check_bytes_target(target, facts: ModelFacts) -> None:
    """ConfigError (one line, before work) when a `bytes=` target is below the smallest file."""
    if target.bytes is None or not facts.tensors:
        return
    smallest = smallest_file(facts)
    if target.bytes < smallest:
        raise ConfigError(
            f"--target bytes={target.bytes / MB:.1f}MB is below the smallest GGUF file this model can be "
            f"({smallest / MB:.1f} MB, every tensor in its smallest type); "
            f"give at least bytes={math.ceil(smallest / 1e5) / 10:.1f}MB"
        )


def mixed_steps(allocation: Allocation, facts: ModelFacts, blocks: int, with_awq: bool) -> list[Step]:
    """The quant steps that write `allocation`: AWQ (when affordable) + GPTQ on each tensor's grid."""
    layers = {t["name"] for t in facts.tensors if is_layer(t)}
    quantized = {n: t for n, t in allocation.types.items() if t in QUANT_TYPES}
    counts = Counter(t for n, t in quantized.items() if n in layers)
    fmt = counts.most_common(1)[0][0] if counts else "q8_0"
    types = {n: t for n, t in quantized.items() if n not in layers or t != fmt}
    config = {"format": fmt, "tensor_types": types}
    recorded = {**config, "types_source": SOURCE}  # the steps that record the types say where they came from
    if all(t == "q8_0" for t in quantized.values()):
        return [Step("quant.rtn", recorded)]  # 8-bit rounding is near-lossless: no calibration needed
    return [Step("quant.gptq", {**recorded, "max_blocks": blocks, **awq_options(blocks, with_awq)})]


def awq_options(blocks: int, with_awq: bool) -> dict:
    """AWQ inside the GPTQ step: one calibration run for both (quant.gptq `awq`), AWQ's
    statistics from at most AWQ_MAX_BLOCKS blocks."""
    return {"awq": True, "awq_blocks": min(blocks, AWQ_MAX_BLOCKS)} if with_awq else {}


def fixed_bytes(facts: ModelFacts, data, steps: list[Step] | None = None) -> int:
    """The file's bytes outside the weight matrices, its header saying where the types came from
    as the steps will record it (the GPTQ step's calibration; `steps` None: a GPTQ attempt)."""
    from kompakt.auto.gguf_bytes import fixed_with_source
    from kompakt.passes.quant_common import calibration_label

    source = {"source": SOURCE}
    gptq = [s for s in steps if s.name == "quant.gptq"] if steps is not None else [None]
    if gptq:
        blocks = data.calibration_blocks if gptq[-1] is None else int(gptq[-1].config["max_blocks"])
        source["calibration"] = calibration_label(min(blocks, data.calibration_blocks), data.block_len)
    return fixed_with_source(facts.gguf_fixed_bytes, facts.gguf_header_bytes, facts.gguf_align, source)


def file_bytes(allocation: Allocation, facts: ModelFacts, steps: list[Step], data) -> int:
    """Bytes of the GGUF the attempt's export writes (the allocation's weights + fixed_bytes)."""
    return allocation.bytes - allocation.fixed + fixed_bytes(facts, data, steps)


def fewest_bytes_within(facts: ModelFacts, data, method: str, ceiling: float) -> Allocation:
    """The fewest bytes whose predicted KL (the layers quantized by `method`) is at most `ceiling`."""
    return within_kl(decisions(facts, method), ceiling, fixed_bytes(facts, data))


def summary(allocation: Allocation, facts: ModelFacts) -> str:
    """What the allocation did, in one line: tensors per type, the embedding's type, predicted
    KL (layers / embedding) and the file's bytes."""
    by_name = {t["name"]: t for t in facts.tensors}
    counts = Counter(t for n, t in allocation.types.items() if is_layer(by_name[n]))
    layers = ", ".join(f"{count} at {t}" for t, count in sorted(counts.items(), key=lambda c: -c[1]))
    outside = [n for n in allocation.types if not is_layer(by_name[n])]
    ends = ", ".join(f"{by_name[n]['gguf_name'].removesuffix('.weight')} {allocation.types[n]}" for n in outside)
    layer_kl = sum(allocation.chosen[n].kl for n in allocation.types if is_layer(by_name[n]))
    return (f"decoder tensors: {layers}; {ends or 'no embedding tensor'}; predicted KL {allocation.kl:.3f} "
            f"({layer_kl:.3f} layers + {allocation.kl - layer_kl:.3f} embedding/output), "
            f"{allocation.bytes / MB:.1f} MB = {facts.fp16_bytes / allocation.bytes:.2f}x")  # fmt: skip


def allocations(target, factor: float, facts: ModelFacts, method: str, ceiling_bytes: int,
                choices: list[str], data) -> list[tuple[str, Allocation, bool]]:  # fmt: skip
    """(label, allocation, meets the target) to try in order, each explained in `choices`:
    the lowest predicted KL within the factor's bytes; when that is predicted past the floor
    (with a margin), the fewest bytes within the floor instead (a size= factor beyond the
    smallest file aims at that file; a bytes= budget below it is a ConfigError); then a looser back-off (half
    the predicted KL, more bytes) while it stays below `ceiling_bytes` (the uniform Q8_0 file)."""
    pieces, fixed = decisions(facts, method), fixed_bytes(facts, data)
    budget = int(facts.fp16_bytes / factor)
    check_bytes_target(target, facts)
    if budget < smallest_file(facts, fixed):  # a size= factor beyond what the types reach: aim at the smallest file
        budget = smallest_file(facts, fixed)
        choices.append(f"{factor:g}x is beyond the smallest file the GGUF types allow "
                       f"({facts.fp16_bytes / budget:.2f}x, {budget / MB:.1f} MB, every tensor in its smallest type)")
    best = within_bytes(pieces, budget, fixed)
    floor = target.max_kl
    ceiling = None if floor is None else PREDICTION_MARGIN * floor
    if ceiling is None or best.kl <= ceiling:
        choices.append(f"mixed precision for {factor:g}x ({budget / MB:.1f} MB), the lowest predicted KL: "
                       + summary(best, facts))  # fmt: skip
        first, meets = best, True
    else:
        first, meets = within_kl(pieces, ceiling, fixed), False
        choices.append(
            f"{factor:g}x ({budget / MB:.1f} MB) is predicted at KL {best.kl:.3f}, past {PREDICTION_MARGIN:g} x the "
            f"floor ({ceiling:.3f}); mixed precision for the fewest bytes within it instead: " + summary(first, facts)
        )
    out = [(f"mixed {facts.fp16_bytes / first.bytes:.2f}x", first, meets)]
    looser = within_kl(pieces, first.kl / 2, fixed)
    if first.bytes < looser.bytes < ceiling_bytes:
        out.append((f"back-off: mixed {facts.fp16_bytes / looser.bytes:.2f}x", looser, False))
        choices.append("back-off: half the predicted KL, more bytes: " + summary(looser, facts))
    return out
