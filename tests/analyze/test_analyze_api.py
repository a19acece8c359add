"""`kompakt.analyze.analyze` end to end on tiny random models (and, slow, on the embedded model)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from kompakt.analyze import Analysis, analyze
from kompakt.errors import ConfigError, DataError, OutputPathError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import tiny_model

SMALL = dict(n_blocks=4, block_len=32, eval_tokens=128, eval_window=32, speed=False)
IDENTITY_LAYER = 2


def _ids(n: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 261, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """A tiny Llama whose layer 2 is an identity (o_proj and down_proj zero), analysed with files."""
    loaded = tiny_model("llama")
    linears = linear_modules(decoder_layers(loaded.model)[IDENTITY_LAYER], arch_for(loaded.model))
    with torch.no_grad():
        linears["attn.o"].weight.zero_()
        linears["mlp.down"].weight.zero_()
    out = tmp_path_factory.mktemp("analysis") / "run"
    return analyze(loaded, _ids(), out=out, **SMALL), out


def test_identity_layer_is_least_important(identity_run):
    analysis, _ = identity_run
    influence = analysis.column("block_influence")
    skip_kl = analysis.column("skip", "kl")
    assert influence[IDENTITY_LAYER] < 1e-6
    assert min(range(4), key=influence.__getitem__) == IDENTITY_LAYER
    assert skip_kl[IDENTITY_LAYER] < 1e-6
    assert min(range(4), key=skip_kl.__getitem__) == IDENTITY_LAYER
    assert analysis.summary["cheapest_to_skip"] == [IDENTITY_LAYER]
    assert analysis.summary["agreement"] == [IDENTITY_LAYER]


def test_numbers_are_consistent(identity_run):
    analysis, _ = identity_run
    assert len(analysis.layers) == 4
    assert all(math.isfinite(kl) and kl >= 0 for kl in analysis.column("quant", "kl"))
    assert sum(row["params"] for row in analysis.layers) + analysis.breakdown.params["embeddings"] + analysis.breakdown.params[
        "lm_head"
    ] + 64 == analysis.breakdown.total_params  # + the final norm
    # The reference pass and kompakt.evaluate score the same positions.
    assert analysis.reference["ppl"] == pytest.approx(analysis.baseline["perplexity"]["ppl"], rel=1e-5)
    assert analysis.settings["heldout"] == {"windows": 4, "window": 32, "tokens": 128, "scored_tokens": 124}
    assert len(analysis.summary["lines"]) == 4


def test_files_written_and_json_round_trips(identity_run):
    analysis, out = identity_run
    names = {path.name for path in out.iterdir()}
    assert {"analysis.json", "analysis.html", "layer_importance.png", "quant_sensitivity.png"} <= names
    assert not [name for name in names if name.endswith(".tmp")]
    saved = json.loads((out / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(analysis.to_dict()))
    assert Analysis.from_dict(saved).to_dict() == saved
    assert len(saved["channels"]["mlp"]) == 4 and len(saved["channels"]["mlp"][0]) == 128


def test_html_is_self_contained(identity_run):
    _, out = identity_run
    page = (out / "analysis.html").read_text()
    assert page.count("<table") >= 3
    assert "Where to cut" in page and "block influence" in page
    assert page.count('src="data:image/png;base64,') >= 2
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page


def test_out_pointing_into_a_file_fails_first(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    for out in (target, target / "sub"):
        with pytest.raises(OutputPathError, match="--out"):
            analyze(None, None, out=out)  # raised before the model or data are looked at
    assert target.read_text() == "x"


def test_bad_sizes_and_short_data():
    loaded = tiny_model("llama")
    with pytest.raises(DataError, match="at least"):
        analyze(loaded, _ids(100), **SMALL)
    with pytest.raises(ConfigError, match="context"):
        analyze(loaded, _ids(), **{**SMALL, "eval_window": 1024, "eval_tokens": 2048})
    with pytest.raises(DataError, match="vocabulary"):
        analyze(loaded, torch.full((1024,), 5000), **SMALL)


@pytest.mark.parametrize("family", ["phi3", "gemma3_text"])
def test_other_families(family):
    analysis = analyze(tiny_model(family), _ids(), reference_eval=False, **SMALL)
    assert analysis.baseline is None and analysis.files == {}
    assert all(math.isfinite(v) for v in analysis.column("block_influence"))
    assert all(math.isfinite(v) for v in analysis.column("skip", "kl"))


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path, wikitext_test):
    from kompakt.data import tokenize_texts
    from kompakt.model.load import load

    loaded = load(None)
    ids = tokenize_texts([wikitext_test.read_text()], loaded.tokenizer, max_tokens=1024)
    analysis = analyze(loaded, ids, out=tmp_path, n_blocks=2, block_len=128, eval_tokens=256, eval_window=128, speed=False)
    assert len(analysis.layers) == 30
    assert analysis.breakdown.tied_embeddings
    assert analysis.breakdown.total_params == loaded.num_parameters()
    assert len(analysis.channels.mlp[0]) == 1536 and len(analysis.channels.heads[0]) == 9
    assert 5 < analysis.reference["ppl"] < 200
    assert all(math.isfinite(v) and v >= 0 for v in analysis.column("quant", "kl"))
    assert (tmp_path / "analysis.html").exists()
