"""How much of plain rounding's KL a quantization method keeps, by grid: the one number the
planner's predictions multiply the measured per-layer / per-tensor rounding costs by.

On plain-rounding grids (the integer groups the light analysis measures; GGUF q4_0, q4_1,
q5_0, q5_1, q8_0, whose llama.cpp reference rounding is round-to-nearest on min/max scales),
GPTQ keeps about half of RTN's KL and AWQ + GPTQ about a third (SmolLM2, 4-bit g64, README's
quantization table: RTN 0.353, GPTQ 0.176, AWQ + GPTQ 0.121).

On grids whose llama.cpp reference rounding already searches its scales (iq4_nl and the
K-quants), the rounding cost the sensitivity measures is that search's, lower than plain
rounding's, so GPTQ and AWQ have less left to win: the kept share is SEARCHED_FACTOR times the
plain one (at most all of it). Fitted on the four mixed AWQ + GPTQ attempts of the two
embedded models' default runs (measured KL minus the embedding's and the plain-grid layers'
predicted share, over the searched-grid layers' rounding cost, 4096 self-generated held-out
tokens): SmolLM2 0.62 and 0.67, Gemma 3 0.69 and 0.64 — 0.655 = 1.93 x 0.34. Before this the
first mixed attempt was under-predicted 1.4-1.7x and crossed the floor on both models.
"""

from __future__ import annotations

KEPT_OF_RTN = {"quant.rtn": 1.0, "quant.gptq": 0.5, "quant.awq+quant.gptq": 0.34}
SEARCHED_GRIDS = frozenset({"iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"})
SEARCHED_FACTOR = 1.93


def kept_of_rtn(method: str, grid: str | None = None) -> float:
    """The share of the rounding KL on `grid` (a GGUF type; None: a plain integer grid) that a
    quantization method ("quant.awq+quant.gptq", "quant.gptq", ...) keeps."""
    share = KEPT_OF_RTN.get(method, KEPT_OF_RTN["quant.gptq"])
    if grid in SEARCHED_GRIDS:
        share = min(1.0, share * SEARCHED_FACTOR)
    return share
