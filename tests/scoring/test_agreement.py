"""The analysis and the passes read one set of numbers: what `kompakt.analyze` ranks least
important is what prune.depth removes, what it ranks most important is what prune.width keeps."""

from __future__ import annotations

import pytest
import torch

from kompakt.analyze import analyze
from kompakt.data import sample_blocks
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.scoring.channels import top_k
from kompakt.scoring.layers import block_influence, rank_layers

N_LAYERS = 6
SETTINGS = dict(n_blocks=6, block_len=32, eval_tokens=128, eval_window=32, speed=False, reference_eval=False, seed=3)
IDS = torch.randint(0, 261, (2048,), generator=torch.Generator().manual_seed(0))


def _model(family: str = "llama"):
    return tiny_model(family, seed=1, num_hidden_layers=N_LAYERS)


def _calibration_blocks() -> torch.Tensor:
    """The blocks the analysis draws (analyze's docstring: n_blocks from the data before the held-out tail)."""
    held = SETTINGS["eval_tokens"]
    return sample_blocks(IDS[:-held], SETTINGS["n_blocks"], SETTINGS["block_len"], seed=SETTINGS["seed"])


def _heldout_windows() -> torch.Tensor:
    held, window = SETTINGS["eval_tokens"], SETTINGS["eval_window"]
    return IDS[-held:].reshape(held // window, window)


def _run(name: str, loaded, blocks: torch.Tensor, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: blocks, seed=0)
    return spec.apply(ctx, build_config(spec, values))


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def analysed(request):
    family = request.param
    return family, analyze(_model(family), IDS, **SETTINGS)


def test_analysis_block_influence_is_the_pass_score(analysed):
    family, analysis = analysed
    loaded = _model(family)
    blocks = _calibration_blocks()
    batches = [blocks[i : i + 4] for i in range(0, len(blocks), 4)]  # analyze's and prune.depth's batch size
    scores = block_influence(loaded.model, decoder_layers(loaded.model), batches)
    assert scores == pytest.approx(analysis.column("block_influence"), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_prune_depth_removes_the_layers_the_analysis_ranks_lowest(analysed, count):
    family, analysis = analysed
    ranking = rank_layers(analysis.column("block_influence"))
    assert analysis.summary["lowest_block_influence"] == ranking[: analysis.summary["k"]]
    report = _run("prune.depth", _model(family), _calibration_blocks(), count=count, method="block_influence")
    assert report.details["removed_layers"] == sorted(ranking[:count])


def test_prune_depth_kl_removes_the_layers_the_analysis_finds_cheapest_to_skip(analysed):
    family, analysis = analysed
    ranking = rank_layers(analysis.column("skip", "kl"))
    assert analysis.summary["cheapest_to_skip"] == ranking[: analysis.summary["k"]]
    # scored on the analysis's held-out windows, one window per forward as the analysis does
    report = _run("prune.depth", _model(family), _heldout_windows(), count=2, method="kl", batch_size=1)
    assert report.details["removed_layers"] == sorted(ranking[:2])
    assert report.details["rounds"][0]["scores"] == pytest.approx(analysis.column("skip", "kl"), abs=2e-6)


def test_prune_width_keeps_the_channels_the_analysis_ranks_highest(analysed):
    family, analysis = analysed
    channels = analysis.channels
    original = _model(family)
    loaded = _model(family)
    spec = arch_for(loaded.model)
    _run("prune.width", loaded, _calibration_blocks(), mlp_fraction=0.5, kv_groups=1, hidden_fraction=0.25)
    for index, (before, after) in enumerate(zip(decoder_layers(original.model), decoder_layers(loaded.model))):
        down_before = linear_modules(before, spec)["mlp.down"].weight
        down_after = linear_modules(after, spec)["mlp.down"].weight
        kept_hidden = top_k(channels.hidden, down_after.shape[0])
        kept_mlp = top_k(channels.mlp[index], down_after.shape[1])
        torch.testing.assert_close(down_after, down_before[kept_hidden][:, kept_mlp], rtol=0, atol=0)
        o_before = linear_modules(before, spec)["attn.o"].weight
        o_after = linear_modules(after, spec)["attn.o"].weight
        head_dim = o_before.shape[1] // len(channels.heads[index])
        group = top_k(channels.kv_groups[index], 1)
        per_group = len(channels.heads[index]) // len(channels.kv_groups[index])
        columns = torch.arange(int(group) * per_group * head_dim, (int(group) + 1) * per_group * head_dim)
        torch.testing.assert_close(o_after, o_before[kept_hidden][:, columns], rtol=0, atol=0)
