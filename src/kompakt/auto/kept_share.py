"""How much of plain rounding's KL a quantization method keeps: the number the planner's
predictions multiply the measured per-layer / per-tensor rounding costs by.

One type for the whole model (the uniform attempts, and the light analysis's per-layer 4-bit
costs): GPTQ keeps about half of RTN's KL and AWQ + GPTQ about a third (SmolLM2, 4-bit g64,
README's quantization table: RTN 0.353, GPTQ 0.176, AWQ + GPTQ 0.121; with 8 calibration
blocks, 4096 self-generated held-out tokens, AWQ + GPTQ measured 0.114 on q4_0 (RTN 0.321), 0.31
of the predicted rounding KL 0.370, and 0.102 on iq4_nl (RTN 0.221), 0.42 of the predicted 0.245).

A per-tensor allocation keeps more of its prediction: ALLOCATED_FACTOR times the share above.
The knapsack picks, for every tensor, the type whose *estimated* cost is lowest, so it favours
the estimates that came out low (selection bias: the Fisher on a few thousand tokens is a noisy
estimate), and its sum under-predicts what the chosen types measure. Fitted on the four mixed
AWQ + GPTQ attempts of the embedded models' default runs (measured KL minus the embedding's
predicted KL, over the layers' predicted rounding KL; 4096 self-generated held-out tokens):
SmolLM2 0.58 and 0.63, Gemma 3 0.67 and 0.58, mean 0.615 = 1.8 x 0.34. Before this, the first
mixed attempt was predicted at 0.135 and measured 0.187 (SmolLM2) and 0.229 (Gemma 3), crossing
the 0.15 floor and costing a whole back-off attempt on both.
"""

from __future__ import annotations

KEPT_OF_RTN = {"quant.rtn": 1.0, "quant.gptq": 0.5, "quant.awq+quant.gptq": 0.34}
ALLOCATED_FACTOR = 1.8


def kept_of_rtn(method: str, allocated: bool = False) -> float:
    """The share of the predicted rounding KL that a quantization method ("quant.awq+quant.gptq",
    "quant.gptq", ...) keeps: on one type for the whole model, or on a per-tensor allocation."""
    share = KEPT_OF_RTN.get(method, KEPT_OF_RTN["quant.gptq"])
    return min(1.0, share * ALLOCATED_FACTOR) if allocated else share
