"""SparseGPT, Wanda and magnitude pruning: relative quality, exact sparsity, N:M validity."""

from __future__ import annotations

import pytest
import torch

from kompakt.ops.sparsegpt import sparsegpt_prune
from kompakt.ops.sparsity_masks import magnitude_prune, mask_from_scores
from kompakt.ops.wanda import wanda_prune

TARGETS = [{"sparsity": 0.5}, {"nm": (2, 4)}, {"nm": (4, 8)}]


def _prune_all(layer, target):
    return (
        sparsegpt_prune(layer.weight, layer.hessian, **target),
        wanda_prune(layer.weight, layer.column_norms, **target),
        magnitude_prune(layer.weight, **target),
    )


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_sparsegpt_beats_wanda_beats_magnitude(layer, target):
    sparse, wanda, magnitude = _prune_all(layer, target)
    errors = [layer.output_error(p.weight) for p in (sparse, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_masks_are_exact_and_applied(layer, target):
    for pruned in _prune_all(layer, target):
        mask = pruned.mask
        assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
        assert int((~mask).sum()) == layer.weight.numel() // 2  # exactly 50 %
        assert bool((pruned.weight[~mask] == 0).all())
        if "nm" in target:
            n, m = target["nm"]
            kept_per_group = mask.reshape(mask.shape[0], -1, m).sum(dim=-1)
            assert bool((kept_per_group == n).all())


def test_wanda_prunes_each_row_equally_and_keeps_weights(layer):
    pruned = wanda_prune(layer.weight, layer.column_norms, sparsity=0.25)
    assert bool((pruned.mask.sum(dim=1) == 96).all())
    assert torch.equal(pruned.weight[pruned.mask], layer.weight[pruned.mask])


def test_magnitude_is_global_by_default_and_per_row_on_request():
    w = torch.arange(1.0, 17.0).reshape(2, 8)  # row 0 holds all the small weights
    assert int(magnitude_prune(w, sparsity=0.5).mask[0].sum()) == 0
    assert bool((magnitude_prune(w, sparsity=0.5, per_row=True).mask.sum(dim=1) == 4).all())


def test_zero_sparsity_changes_nothing(layer):
    unchanged = sparsegpt_prune(layer.weight, layer.hessian, sparsity=0.0).weight
    assert torch.equal(unchanged, layer.weight)
    assert bool(wanda_prune(layer.weight, layer.column_norms, sparsity=0.0).mask.all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"nm": (2, 3)}, "multiple of 3"),
        ({"nm": (4, 4)}, "0 < N < M"),
        ({}, "either"),
        ({"sparsity": 0.5, "nm": (2, 4)}, "either"),
    ],
)
def test_bad_targets_raise(layer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        wanda_prune(layer.weight, layer.column_norms, **kwargs)
    with pytest.raises(ValueError, match=message):
        magnitude_prune(layer.weight, **kwargs)
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(layer.weight, layer.hessian, **kwargs)


def test_ties_break_by_column_index():
    mask = mask_from_scores(torch.ones(1, 8), sparsity=0.5)
    assert mask.tolist() == [[False] * 4 + [True] * 4]


@pytest.mark.parametrize("target", TARGETS[:2], ids=str)
def test_sparsegpt_takes_over_an_accumulator_with_the_same_bits(target):
    """Given the accumulator, SparseGPT factorises its running sum in place (no [in, in] copies)
    and prunes exactly as from the finalized matrix; the accumulator is used up."""
    from kompakt.ops.hessian import HessianAccumulator

    torch.manual_seed(0)
    weight, acc = torch.randn(24, 64), HessianAccumulator(64)
    x = torch.randn(4, 32, 64)
    x[..., 5] = 0.0  # a dead input: its column is dropped either way
    acc.add_batch(x)
    copied = sparsegpt_prune(weight, acc.finalize(), **target)
    taken = sparsegpt_prune(weight, acc, **target)
    assert torch.equal(copied.weight, taken.weight) and torch.equal(copied.mask, taken.mask)
    assert copied.loss == taken.loss
    with pytest.raises(ValueError, match="already taken"):
        acc.take()
