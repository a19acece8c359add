"""The KL an attempt is predicted to end at, from the light analysis, and the same prediction
recalibrated on what the run has measured so far.

The model (stated so that its error can be measured; tests/auto/test_predict.py does):
- rounding all layers costs about the sum of what rounding each layer alone costs (the
  analysis measures each layer at 4 bits on groups of 32, the q4_0 block size: `quant_kl`);
- GPTQ keeps about half of RTN's KL and AWQ + GPTQ about a third, of a per-tensor allocation's
  predicted KL more (kompakt.auto.kept_share);
- 8-bit blocks have 1/16 of the 4-bit rounding error, so 1/256 of the KL (KL is quadratic);
- removing a layer costs its skip KL, of which distillation wins back about half (planner).

With per-tensor costs (kompakt.scoring.tensor_sensitivity: Fisher-weighted rounding error of
each tensor in each GGUF type, ModelFacts.tensors), the prediction is their sum for the types
export writes (`tensor_kl`): the decoder tensors' times the method's share above, the
embedding / output's whole (the export rounds them, no pass does). Measured on SmolLM2 (RTN,
layers Q4_0, embedding Q8_0, 1024 held-out tokens): predicted 0.370, measured 0.339.

The first quantization attempt the run measures calibrates the rest: its measured / predicted
ratio multiplies the later quantization predictions (`calibrated`), which is what the report
ranks the attempts by beside the measured KL.

Measured (tests/auto/test_predict.py, 2048 held-out self-generated tokens): RTN on the q4_0
grid, predicted / measured KL: SmolLM2 0.349 / 0.314, Gemma 3 0.334 / 0.320; RTN Q8_0: SmolLM2
0.00136 / 0.00136, Gemma 3 0.0013 / 0.0006. Gemma 3's plan once predicted 0.457 where GPTQ
alone measured 0.202: its analysis windows lacked the <bos> Gemma needs (per-layer KLs ~3x
too high; fixed in kompakt.analyze) and rounded on groups of 64; the model above now predicts
0.167 for GPTQ alone there.
"""

from __future__ import annotations

from kompakt.auto.facts import ModelFacts
from kompakt.auto.kept_share import kept_of_rtn
from kompakt.auto.mixed import has_costs, is_layer
from kompakt.recipe.schema import Step

EIGHT_BIT = 1 / 256


def _method(steps: list[Step]) -> tuple[str, int] | None:
    """(method, bits) of the attempt's quantization steps, None when it does not quantize."""
    names = [n for s in steps if s.name.startswith("quant.") for n in ["quant.awq"] * bool(s.config.get("awq")) + [s.name]]
    if not names:
        return None
    last = steps[[s.name for s in steps].index(names[-1])].config
    bits = 8 if last.get("format") == "q8_0" or last.get("bits") == 8 else 4
    return "+".join(names), bits


def _tensor_types(facts: ModelFacts, config: dict) -> dict[str, str]:
    """The type export writes each tensor in after a quant step with `config`: its tensor_types,
    else the format (the output matrix at Q8_0, as the export keeps it; f16 where rows do not fit)."""
    fmt, chosen, types = config.get("format"), config.get("tensor_types") or {}, {}
    tied = not any(t["gguf_name"] == "output.weight" for t in facts.tensors)
    for tensor in facts.tensors:
        output = tensor["gguf_name"] == "output.weight" or (tied and tensor["gguf_name"] == "token_embd.weight")
        default = fmt if is_layer(tensor) or not output else "q8_0"
        wanted = chosen.get(tensor["name"], default)
        types[tensor["name"]] = wanted if wanted in tensor["kl"] else "f16"
    return types


def tensor_kl(facts: ModelFacts, steps: list[Step]) -> float | None:
    """Predicted KL from the per-tensor costs (ModelFacts.tensors): the layers' plain-rounding KL
    times the method's share plus the embedding / output's (the export rounds those); None
    without costs or a quantization step on a GGUF grid."""
    method = _method(steps)
    config = next((s.config for s in reversed(steps) if s.name.startswith("quant.")), {})
    if method is None or not has_costs(facts) or not config.get("format"):
        return None
    types, share = _tensor_types(facts, config), kept_of_rtn(method[0])
    return sum(t["kl"][types[t["name"]]] * (share if is_layer(t) else 1.0) for t in facts.tensors)


def quant_kl(facts: ModelFacts, steps: list[Step], kept: list[int] | None = None) -> float | None:
    """Predicted KL of the quantization steps on the layers `kept` (all by default): from the
    per-tensor costs when the facts have them and no layer is removed, else from the per-layer
    analysis; None without either or without a quantization step."""
    if kept is None:
        from_tensors = tensor_kl(facts, steps)
        if from_tensors is not None:
            return from_tensors
    method = _method(steps)
    if not facts.quant_kl or method is None:
        return None
    layers = kept if kept is not None else range(facts.layers)
    rtn = sum(facts.quant_kl[i] for i in layers)
    name, bits = method
    factor = kept_of_rtn(name)
    return rtn * factor * (EIGHT_BIT if bits == 8 else 1.0)


def calibrated(outcomes: list[dict]) -> None:
    """Fill `calibrated_kl` of each outcome after the first measured one: its prediction times
    the measured / predicted ratio of the last measured attempt before it."""
    ratio = None
    for outcome in outcomes:
        predicted, measured = outcome.get("predicted_kl"), outcome.get("measured_kl")
        if ratio is not None and predicted is not None:
            outcome["calibrated_kl"] = predicted * ratio
            outcome["calibrated_on"] = ratio
        if predicted and measured is not None and outcome.get("finished"):
            ratio = measured / predicted
