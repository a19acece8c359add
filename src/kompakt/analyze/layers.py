"""Layer importance: block influence and the cost of skipping a layer.

Block influence (ShortGPT, Men et al. 2024): BI_i = 1 - cos(x_i, y_i) averaged over tokens,
where x_i is decoder layer i's input hidden state and y_i its output. A layer that barely
turns the residual stream (BI near 0) is a candidate for removal. Read from forward hooks on
the decoder layers (not output_hidden_states: Hugging Face applies the final norm to the last
hidden state, which would distort the last layer's BI).

Skip cost: perplexity and KL(original || edited) on held-out text when that one layer is
replaced by the identity, measured against the unmodified model (see reference.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kompakt.analyze.reference import Reference, Score, score, skipped


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class BlockInfluence:
    """Accumulates the token-mean of 1 - cos(input, output) of each decoder layer."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.sums = torch.zeros(len(layers), dtype=torch.float64)
        self.counts = torch.zeros(len(layers), dtype=torch.float64)

    def attach(self) -> list:
        """Register the hooks; returns their handles (remove them when done)."""
        return [
            layer.register_forward_hook(self._hook(index), with_kwargs=True)
            for index, layer in enumerate(self.layers)
        ]

    def _hook(self, index: int) -> Callable:
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = _first(output)
            # [batch, seq, hidden] -> cosine per token, in fp32 for bf16 models. A zero input
            # (e.g. a padding embedding) has no direction: such tokens are left out.
            inputs, outputs = inputs.float(), outputs.float()
            keep = inputs.norm(dim=-1) > 0
            cos = torch.nn.functional.cosine_similarity(inputs[keep], outputs[keep], dim=-1)
            self.sums[index] += float((1.0 - cos).double().sum())
            self.counts[index] += cos.numel()

        return hook

    def values(self) -> list[float]:
        return (self.sums / self.counts.clamp_min(1)).tolist()


def skip_costs(
    model: nn.Module,
    layers: nn.ModuleList,
    reference: Reference,
    advance: Callable[[], None] = lambda: None,
) -> list[Score]:
    """Score the model with each decoder layer skipped in turn (one at a time)."""
    scores = []
    for index in range(len(layers)):
        with skipped(layers, index, reference) as current:
            scores.append(score(model, reference, current))
        advance()
    return scores
