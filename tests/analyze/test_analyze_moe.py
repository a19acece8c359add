"""`kompakt analyze` on tiny MoE models: routing frequency, REAP saliency and routing entropy
per layer and expert, in the Analysis, its JSON, its HTML and the CLI's output."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from kompakt.analyze import Analysis, analyze
from kompakt.cli.app import main
from kompakt.model import moe
from kompakt.model.arch import arch_for, decoder_layers
from kompakt.model.tiny import TINY_MOE, save_tiny, tiny_model

SMALL = dict(n_blocks=4, block_len=32, eval_tokens=128, eval_window=32, speed=False)


def _ids(n: int = 1024) -> torch.Tensor:
    return torch.randint(0, 261, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", TINY_MOE)
def test_moe_analysis_has_expert_statistics(family, tmp_path):
    loaded = tiny_model(family)
    analysis = analyze(loaded, _ids(), out=tmp_path, reference_eval=False, **SMALL)
    experts = analysis.experts
    assert experts is not None and experts.tokens == [4 * 32] * 2
    for row in analysis.layers:
        fields = row["experts"]
        assert sum(fields["share"]) == pytest.approx(moe.top_k(loaded))
        assert 0 < fields["routing_entropy"] <= math.log(4) + 1e-6 and 0 < fields["load_entropy"] <= 1 + 1e-9
        assert fields["lowest_reap"] == int(np.argmin(fields["reap"]))
    assert any(line.startswith("Lowest REAP saliency") for line in analysis.summary["lines"])
    assert all(math.isfinite(v) for v in analysis.column("skip", "kl"))
    again = Analysis.from_dict(json.loads((tmp_path / "analysis.json").read_text()))
    assert np.allclose(again.experts.reap[1], experts.reap[1])
    assert "Experts (routing on the calibration tokens)" in (tmp_path / "analysis.html").read_text()


def test_a_silenced_expert_has_the_lowest_reap():
    """Zeroing expert 2's down projection in layer 1 makes its output (and REAP) zero while it is
    still routed: the analysis names it as the expert to remove first."""
    loaded = tiny_model("mixtral")
    with torch.no_grad():
        moe.expert_linears(decoder_layers(loaded)[1], arch_for(loaded).moe, 2)["expert.down"].zero_()
    analysis = analyze(loaded, _ids(), reference_eval=False, **SMALL)
    fields = analysis.layers[1]["experts"]
    assert fields["lowest_reap"] == 2 and fields["reap"][2] == 0 and fields["share"][2] > 0


def test_dense_analysis_has_no_experts():
    analysis = analyze(tiny_model("llama"), _ids(), reference_eval=False, **SMALL)
    assert analysis.experts is None and "experts" not in analysis.layers[0]
    assert analysis.to_dict()["experts"] is None


def test_cli_analyze_and_eval_on_moe(tmp_path, capsys):
    save_tiny("qwen2_moe", tmp_path / "model")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "model", "small"]
    (tmp_path / "data.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)))
    args = ["analyze", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "out"),
            "--json", "--tokens", "1024",
            "--blocks", "2", "--block-len", "32", "--eval-tokens", "64", "--window", "32", "--no-speed"]  # fmt: skip
    try:
        main(args)
    except SystemExit as done:
        assert not done.code
    result = json.loads(capsys.readouterr().out)
    assert len(result["experts"]["reap"]) == 2 and len(result["layers"][0]["experts"]["share"]) == 4
    model = str(tmp_path / "model")
    try:
        main(["eval", model, "--reference", model, "--data", str(tmp_path / "data.txt"), "--window", "64",
              "--max-tokens", "512", "--no-speed", "--json"])  # fmt: skip
    except SystemExit as done:
        assert not done.code
    out = json.loads(capsys.readouterr().out)
    assert math.isfinite(out["ppl"]) and out["kl_mean"] == pytest.approx(0.0, abs=1e-6) and out["top1"] == 1.0
