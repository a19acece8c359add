"""Minitron channel importance: the (batch=L2, seq=mean) formula, batching, KV groups, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kompakt.model.arch import arch_for, decoder_layers, linear_modules, norm_modules
from kompakt.model.tiny import tiny_model
from kompakt.scoring.channels import ChannelImportance, channel_importance, top_k

BLOCKS = torch.randint(3, 261, (6, 24), generator=torch.Generator().manual_seed(0))


def _captured(family: str) -> dict:
    """Raw activations [blocks, seq, units] at every point the importances read, from our own hooks."""
    loaded = tiny_model(family)
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    seen: dict = {}

    def keep(key, use_output: bool):
        def hook(module, args, output=None):
            seen.setdefault(key, []).append((output if use_output else args[0]).detach().float())

        return hook

    handles = []
    for i, layer in enumerate(layers):
        linears, norms = linear_modules(layer, spec), norm_modules(layer, spec)
        handles.append(linears["mlp.down"].register_forward_pre_hook(keep(("mlp", i), False)))
        handles.append(linears["attn.o"].register_forward_pre_hook(keep(("o", i), False)))
        for role in ("attn.pre", "mlp.pre"):
            handles.append(norms[role].register_forward_hook(keep(("norm", i, role), True)))
    with torch.no_grad():
        loaded.model(input_ids=BLOCKS, use_cache=False)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(value) for key, value in seen.items()}


def _minitron(per_position: torch.Tensor) -> np.ndarray:
    """mean over the sequence per block, then RMS (L2 / sqrt(n)) over the blocks."""
    per_block = per_position.mean(dim=1)  # [blocks, units]
    return per_block.pow(2).mean(dim=0).sqrt().double().numpy()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_importance_is_mean_over_sequence_then_l2_over_blocks(family):
    raw = _captured(family)
    loaded = tiny_model(family)
    layers = decoder_layers(loaded.model)
    # batches of 4 and 2: the result must not depend on how blocks are grouped into forwards
    result = channel_importance(loaded.model, layers, [BLOCKS[:4], BLOCKS[4:]])
    hidden = 0
    for i in range(len(layers)):
        np.testing.assert_allclose(result.mlp[i], _minitron(raw[("mlp", i)].abs()), rtol=1e-5)
        per_head = raw[("o", i)].unflatten(-1, (4, -1)).norm(dim=-1)  # 4 heads, L2 over head_dim per position
        np.testing.assert_allclose(result.heads[i], _minitron(per_head), rtol=1e-5)
        np.testing.assert_allclose(result.kv_groups[i], result.heads[i].reshape(2, 2).sum(-1), rtol=1e-12)
        hidden = hidden + sum(_minitron(raw[("norm", i, role)].abs()) for role in ("attn.pre", "mlp.pre"))
    np.testing.assert_allclose(result.hidden, hidden, rtol=1e-5)


def test_top_k_returns_sorted_indices_and_breaks_ties_to_the_lower_index():
    assert top_k(np.array([0.5, 2.0, 1.0, 2.0, 0.1]), 3).tolist() == [1, 2, 3]
    assert top_k([1.0, 1.0, 1.0], 2).tolist() == [0, 1]
    assert top_k(torch.tensor([3.0, 1.0, 2.0]), 1).dtype == torch.long


def test_round_trip_and_older_files_without_hidden():
    result = ChannelImportance.from_heads([np.ones(4)], [np.arange(4.0)], np.ones(3), n_kv=2)
    assert result.kv_groups[0].tolist() == [1.0, 5.0]
    assert ChannelImportance.from_dict(result.to_dict()).to_dict() == result.to_dict()
    old = {key: value for key, value in result.to_dict().items() if key != "hidden"}
    assert ChannelImportance.from_dict(old).hidden is None
