"""`analyze` on sentence encoders: API and CLI on tiny encoders, the real all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kompakt.analyze import Analysis, analyze, analyze_encoder
from kompakt.errors import DataError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import save_tiny_encoder, tiny_encoder

WORDS = "the a cat dog model layer river city music paper reads finds small quiet green old new runs sees".split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(n)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _silence(loaded, index: int) -> None:
    """Zero the attention-output and FFN-output Linears of one layer: with the post-LN
    LayerNorms at their initial (1, 0) it then passes an already normalised stream through."""
    linears = linear_modules(decoder_layers(loaded.model)[index], arch_for(loaded.model))
    with torch.no_grad():
        for role in ("attn.o", "mlp.down"):
            linears[role].weight.zero_()
            linears[role].bias.zero_()


def test_api_dispatches_on_encoders_and_ranks_a_silenced_layer_cheapest(tmp_path):
    loaded = tiny_encoder("bert")
    _silence(loaded, 2)
    analysis = analyze(loaded, _sentences(100), out=tmp_path / "out")
    assert analysis.is_encoder and analysis.settings["heldout"]["sentences"] == 64
    skip = [row["skip"] for row in analysis.layers]
    assert skip[2]["loss"] < 1e-5 < min(s["loss"] for i, s in enumerate(skip) if i != 2)
    assert analysis.summary["cheapest_to_skip"] == [2] and analysis.summary["skip_order"][0] == 2
    assert sorted(analysis.summary["skip_order"]) == [0, 1, 2, 3]
    assert all(s["loss"] == pytest.approx(1 - s["cosine"]) and s["min_cosine"] <= s["cosine"] for s in skip)
    # 4-bit RTN of one layer moves embeddings less than removing a (working) layer does.
    assert all(row["quant"]["loss"] < row["skip"]["loss"] for row in analysis.layers if row["index"] != 2)
    assert "skip 1-cos" in analysis.summary["lines"][0]
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert Analysis.from_dict(saved).layers == analysis.layers
    assert "skip cos" in (tmp_path / "out" / "analysis.html").read_text()


@pytest.mark.parametrize("family", ["distilbert", "roberta", "modernbert"])
def test_every_encoder_family_is_analysed(family):
    loaded = tiny_encoder(family)
    analysis = analyze_encoder(loaded, _sentences(24), calib_sentences=8, eval_sentences=8)
    model = analysis.model
    assert model["layers"] == 4 and model["hidden_size"] == 64 and model["intermediate_size"] == 128
    assert [len(row) for row in analysis.channels.heads] == [4] * 4
    assert [len(row) for row in analysis.channels.mlp] == [128] * 4
    parts = analysis.breakdown
    assert parts.total_params == loaded.num_parameters()
    assert parts.params["attention"] > 0 and parts.params["mlp"] > 0 and parts.params["lm_head"] == 0


def test_breakdown_counts_bert_linears_by_role():
    """BERT's FFN output Linear (`output.dense`) sits outside `intermediate`: it is still MLP."""
    analysis = analyze_encoder(tiny_encoder("bert"), _sentences(12), calib_sentences=4, eval_sentences=4)
    layer = analysis.breakdown.per_layer[0]
    assert layer["attention"] == 4 * (64 * 64 + 64)
    assert layer["mlp"] == 2 * 64 * 128 + 128 + 64
    assert layer["norms"] == 2 * 2 * 64 and layer["other"] == 0
    assert analysis.breakdown.params["other"] == 64 * 64 + 64  # BertModel's pooler: unused by embeddings


def test_bad_input_is_a_one_line_error():
    loaded = tiny_encoder("bert")
    with pytest.raises(DataError, match="at least 9 sentences"):
        analyze_encoder(loaded, _sentences(5), eval_sentences=8)
    with pytest.raises(DataError, match="sentences"):
        analyze(loaded, torch.arange(100))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc-cli")
    save_tiny_encoder("bert", root / "enc")
    (root / "data.txt").write_text(" ".join(_sentences(40)) + "\n")
    (root / "one.txt").write_text("Only one sentence here.\n")
    return root


def test_cli_json_and_tables(encoder_dir, cli):
    root = encoder_dir
    small = ["--data", str(root / "data.txt"), "--calib-sentences", "8", "--eval-sentences", "8"]
    code, out, err = cli(["analyze", str(root / "enc"), *small, "--out", str(root / "out"), "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["settings"]["task"] == "embed" and len(result["layers"]) == 4
    assert result["settings"]["calibration"]["sentences"] == 8 and "data.txt" in result["settings"]["data"]
    assert (root / "out" / "analysis.html").exists()
    code, out, err = cli(["analyze", str(root / "enc"), *small, "--out", str(root / "out2")])
    assert code == 0, err
    assert "skip cos" in out and "Where to cut" in out and "embedding model" in out


def test_cli_without_data_uses_the_shipped_sentences(encoder_dir, cli):
    args = ["analyze", str(encoder_dir / "enc"), "--calib-sentences", "8", "--eval-sentences", "8",
            "--out", str(encoder_dir / "out3"), "--json"]  # fmt: skip
    code, out, err = cli(args)
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert "shipped" in settings["data"] and settings["heldout"]["sentences"] == 8


def test_cli_too_few_sentences_exits_2(encoder_dir, cli):
    code, out, err = cli(["analyze", str(encoder_dir / "enc"), "--data", str(encoder_dir / "one.txt")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sentences" in err


@pytest.mark.slow
def test_cli_on_the_embedded_minilm(tmp_path, cli):
    """`kompakt analyze all-minilm-l6-v2` offline (small sentence counts keep it well under a minute)."""
    args = ["analyze", "all-minilm-l6-v2", "--calib-sentences", "24", "--eval-sentences", "24",
            "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    code, out, err = cli(args)
    assert code == 0, err
    result = json.loads(out)
    assert result["model"]["layers"] == 6 and result["model"]["context_length"] == 256
    assert 22_000_000 < result["breakdown"]["total_params"] < 23_000_000
    assert result["breakdown"]["params"]["embeddings"] > result["breakdown"]["params"]["mlp"]
    losses = [row["skip"]["loss"] for row in result["layers"]]
    assert all(0 < loss < 1 for loss in losses)
    assert all(row["quant"]["cosine"] > 0.95 for row in result["layers"])
    assert result["summary"]["skip_order"][-1] == 5  # the last layer shapes the pooled embedding most


def test_per_linear_quantizes_each_linear_alone(tmp_path):
    """A Linear of zeros is exact on any grid: its own cost is 0 (and its consumer's: the FFN output
    then sees only zeros), the same Linear of the other layers and the attention Linears cost more."""
    loaded = tiny_encoder("bert")
    up = linear_modules(decoder_layers(loaded.model)[1], arch_for(loaded.model))["mlp.up"]
    with torch.no_grad():
        up.weight.zero_()
    analysis = analyze_encoder(loaded, _sentences(24), calib_sentences=8, eval_sentences=8, per_linear=True,
                               out=tmp_path / "out")  # fmt: skip
    costs = analysis.layers[1]["quant"]["per_linear"]
    assert set(costs) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"}
    assert costs["mlp.up"] == 0 and costs["attn.v"] > 0 and costs["attn.o"] > 0
    assert all(row["quant"]["per_linear"]["mlp.up"] > 0 for row in analysis.layers if row["index"] != 1)
    assert "RTN of one Linear alone" in (tmp_path / "out" / "analysis.html").read_text()
