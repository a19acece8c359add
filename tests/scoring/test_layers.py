"""Block influence, angular distance and the layer ranking on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kompakt.scoring.layers import BlockInfluence, angular_distances, rank_layers, token_cosines


class _Layer(nn.Module):
    """x -> x + W x + b: the bias moves a zero input off zero, so only layer 0 sees it."""

    def __init__(self, seed: int, identity: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(8, 8)
        if identity:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states):
        return hidden_states + self.linear(hidden_states)


class _Stack(nn.Module):
    """Embeds ids as one-hot-ish vectors (id 0 -> zero vector) and runs the layers."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers
        self.embed = nn.Embedding(5, 8, padding_idx=0)

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def _stack(identity: int | None = None) -> _Stack:
    torch.manual_seed(0)
    stack = _Stack(nn.ModuleList(_Layer(seed, identity=seed == identity) for seed in range(3)))
    with torch.no_grad():
        stack.embed.weight[0].zero_()
    return stack


def _states(stack: _Stack, ids: torch.Tensor) -> list[torch.Tensor]:
    states = [stack.embed(ids)]
    for layer in stack.layers:
        states.append(layer(states[-1]))
    return [s.detach().reshape(-1, 8) for s in states]


def test_token_cosines_leave_out_tokens_without_direction():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(token_cosines(a, b), torch.tensor([math.sqrt(0.5), -1.0]))


def test_block_influence_is_one_minus_mean_cosine_over_tokens_with_a_direction():
    stack = _stack()
    ids = torch.tensor([[1, 0, 2, 3], [0, 4, 4, 1]])  # id 0 embeds to the zero vector
    influence = BlockInfluence(stack.layers)
    handles = influence.attach()
    with torch.no_grad():
        stack(ids)
    for handle in handles:
        handle.remove()
    states = _states(stack, ids)
    expected = []
    for i in range(3):
        x, y = states[i], states[i + 1]
        keep = x.norm(dim=-1) > 0
        expected.append(float(1 - torch.nn.functional.cosine_similarity(x[keep], y[keep], dim=-1).mean()))
    assert influence.values() == pytest.approx(expected, rel=1e-5)
    assert influence.counts.tolist() == [6, 8, 8]  # the two zero tokens only lack a direction at layer 0
    # counting them as cos = 0 (the old prune.depth behaviour) would have inflated layer 0
    with_zeros = float(1 - torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1).mean())
    assert with_zeros > influence.values()[0] + 0.1


def test_angular_distance_and_ranking_find_the_identity_layer():
    stack = _stack(identity=1)
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    distances = angular_distances(stack, stack.layers, [ids], width=1)
    assert len(distances) == 3 and distances[1] == pytest.approx(0.0, abs=1e-4)
    assert rank_layers(distances)[0] == 1
    states = _states(stack, ids)
    expected = torch.arccos(torch.nn.functional.cosine_similarity(states[0], states[2], dim=-1).clamp(-1, 1)) / math.pi
    assert angular_distances(stack, stack.layers, [ids], width=2)[0] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_rank_layers_breaks_ties_towards_deeper_layers_and_puts_nan_last():
    assert rank_layers([0.2, 0.1, 0.1, math.nan, 0.3]) == [2, 1, 0, 4, 3]
