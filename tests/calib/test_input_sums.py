"""Σ x² per input channel of every decoder Linear (llama-imatrix's statistics) from one forward pass."""

from __future__ import annotations

import pytest
import torch

from kompakt.calib.input_sums import collect_input_sums, decoder_linears
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(3, 261, (5, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_sums_are_the_squared_inputs_of_each_linear(family):
    """Every decoder Linear of every layer (fused ones and a wrapped decoder too), counted once per
    token, summed over batches exactly as a hook on the plain forward sees the inputs."""
    model = tiny_model(family).model
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [linear.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
               for name, linear in decoder_linears(model).items()]  # fmt: skip
    with torch.no_grad():
        for start in range(0, 5, 2):
            model(input_ids=BLOCKS[start : start + 2])
    for handle in handles:
        handle.remove()

    stats = collect_input_sums(model, BLOCKS, batch_size=2)

    per_layer = len(linear_modules(decoder_layers(model)[0], arch_for(model)))
    assert len(stats) == per_layer * len(decoder_layers(model)) == len(seen)
    for name, s in stats.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]])
        assert s.n_samples == BLOCKS.numel()
        torch.testing.assert_close(s.sq_sum, rows.square().sum(0), rtol=1e-5, atol=1e-6)
    assert not any(name.endswith("lm_head") for name in stats)  # as llama-imatrix without --process-output


def test_model_is_unchanged_and_hooks_removed():
    model = tiny_model("llama").model
    before = model(input_ids=BLOCKS[:1]).logits
    collect_input_sums(model, BLOCKS[:2])
    assert all(not linear._forward_pre_hooks for linear in decoder_linears(model).values())
    torch.testing.assert_close(model(input_ids=BLOCKS[:1]).logits, before)
