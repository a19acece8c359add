"""Layer importance from hidden states: block influence, angular distance, and the ranking.

Block influence (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are
More Redundant Than You Expect"): BI_i = 1 - E_{X,t}[x_{i,t}^T x_{i+1,t} /
(||x_{i,t}|| ||x_{i+1,t}||)], the expected cosine between decoder layer i's input x_i and its
output x_{i+1} over calibration tokens t. A layer that barely turns the residual stream (BI near
0) is a candidate for removal.

Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
Layers"): d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi between the input of layer l and the
input of layer l+n; the block l..l+n-1 with the smallest distance is the one to remove. The
paper uses the last token; every token is a lower-variance estimate of the same quantity.

Which tokens count: the cosine of a zero vector is undefined (it has no direction), so a token
whose input to the compared span has zero norm (e.g. a padding id whose embedding is zero) is
left out of the expectation instead of being counted as cos = 0 (which would make the first
layer look important for no reason). States are read from forward hooks on the decoder layers,
not `output_hidden_states` (Hugging Face applies the final norm to the last hidden state, which
would distort the last layer's score), and compared in fp32. Padding positions of padded
sentences (an encoder's calibration form) are left out like zero-norm tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from kompakt.model.inputs import Batch, token_mask
from kompakt.scoring.hooks import forward_with_hooks


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def token_cosines(inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """cos(input, output) per token, [..., hidden] -> [kept tokens] in fp32, in [-1, 1].

    Tokens whose input has zero norm, and padding (`mask` [...] False), are left out (see the
    module docstring).
    """
    inputs, outputs = inputs.float().flatten(0, -2), outputs.float().flatten(0, -2)
    keep = inputs.norm(dim=-1) > 0
    if mask is not None:
        keep &= mask.reshape(-1).to(keep.device)
    cos = torch.nn.functional.cosine_similarity(inputs[keep], outputs[keep], dim=-1)
    return cos.clamp(-1.0, 1.0)


class BlockInfluence:
    """Accumulates BI of every decoder layer from forward hooks (attach, run forwards, values)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.sums = torch.zeros(len(layers), dtype=torch.float64)
        self.counts = torch.zeros(len(layers), dtype=torch.float64)
        self.mask: torch.Tensor | None = None  # the running batch's real tokens

    def before(self, batch: Batch) -> None:
        self.mask = token_mask(batch)

    def attach(self) -> list:
        """Register the hooks; returns their handles (remove them when done)."""
        return [
            layer.register_forward_hook(self._hook(index), with_kwargs=True)
            for index, layer in enumerate(self.layers)
        ]

    def _hook(self, index: int) -> Callable:
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            cos = token_cosines(inputs, _first(output), self.mask)
            self.sums[index] += float((1.0 - cos).double().sum())
            self.counts[index] += cos.numel()

        return hook

    def values(self) -> list[float]:
        """BI per layer (nan for a layer that saw no token with a direction)."""
        return [s / c if c else math.nan for s, c in zip(self.sums.tolist(), self.counts.tolist())]


def block_influence(model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch]) -> list[float]:
    """ShortGPT BI of every layer over the tokens of `batches` ([batch, seq] ids or padded sentences)."""
    influence = BlockInfluence(layers)
    forward_with_hooks(model, batches, influence.attach(), influence.before)
    return influence.values()


def angular_distances(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch], width: int
) -> list[float]:
    """Mean angular distance between the input of layer l and of layer l + width, for every l."""
    states: list[torch.Tensor] = []  # inputs of every layer, then the last layer's output
    mask: list[torch.Tensor | None] = [None]  # the running batch's real tokens

    def pre_hook(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def last_hook(module, args, kwargs, output):
        states.append(_first(output).detach())

    starts = len(layers) - width + 1
    sums, counts = torch.zeros(starts, dtype=torch.float64), torch.zeros(starts, dtype=torch.float64)

    def after_layer_hook(module, args, kwargs, output):  # the last layer ran: all states are in
        last_hook(module, args, kwargs, output)
        for start in range(starts):
            angle = torch.arccos(token_cosines(states[start], states[start + width], mask[0])) / math.pi
            sums[start] += float(angle.double().sum())
            counts[start] += angle.numel()
        states.clear()

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after_layer_hook, with_kwargs=True))
    forward_with_hooks(model, batches, handles, lambda batch: mask.__setitem__(0, token_mask(batch)))
    return [s / c if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())]


def rank_layers(scores: list[float]) -> list[int]:
    """Layer indices from least to most important (lowest score first).

    Ties go to the later layer first (deeper layers are the more redundant ones, as ShortGPT
    observes); nan (not measured) ranks last. prune.depth removes the first n of this order and
    the analysis names the first k, so both read one ranking.
    """
    def key(i: int) -> tuple[float, int]:
        return (math.inf if math.isnan(scores[i]) else scores[i], -i)

    return sorted(range(len(scores)), key=key)
