"""The planner's KL prediction (kompakt.auto.predict): per-method shares, the recalibration on
measured attempts, and its error against measured runs on a tiny model and (slow) on both
embedded models."""

from __future__ import annotations

import pytest

from kompakt.auto.predict import calibrated, quant_kl
from kompakt.recipe.schema import Step

pytestmark = pytest.mark.usefixtures("one_thread")
Q4 = {"format": "q4_0"}


def _facts(per_layer: list[float]):
    from kompakt.auto.facts import ModelFacts

    return ModelFacts(name="m", fingerprint="f", params=10, fp16_bytes=20, layers=len(per_layer),
                      layer_params=[1] * len(per_layer), embedding_params=1, gguf=True, format_bytes={},
                      forward_tps=1.0, quant_kl=per_layer)  # fmt: skip


def test_prediction_per_method_and_bits():
    facts = _facts([0.1, 0.2, 0.3])
    rtn = quant_kl(facts, [Step("quant.rtn", Q4)])
    gptq = quant_kl(facts, [Step("quant.gptq", Q4)])
    both = quant_kl(facts, [Step("quant.awq", Q4), Step("quant.gptq", Q4)])
    assert rtn == pytest.approx(0.6) and both < gptq < rtn
    assert quant_kl(facts, [Step("quant.rtn", {"format": "q8_0"})]) == pytest.approx(0.6 / 256)
    assert quant_kl(facts, [Step("quant.rtn", Q4)], kept=[0, 2]) == pytest.approx(0.4)
    assert quant_kl(facts, [Step("prune.depth", {"count": 1})]) is None
    assert quant_kl(_facts([]), [Step("quant.rtn", Q4)]) is None


def test_later_predictions_are_calibrated_on_the_last_finished_attempt():
    outcomes = [{"predicted_kl": 0.4, "measured_kl": 0.2, "finished": True},
                {"predicted_kl": 0.01, "measured_kl": None, "finished": False},
                {"predicted_kl": 0.002, "measured_kl": 0.0012, "finished": True}]  # fmt: skip
    calibrated(outcomes)
    assert "calibrated_kl" not in outcomes[0]
    assert outcomes[1]["calibrated_kl"] == pytest.approx(0.005) and outcomes[2]["calibrated_kl"] == pytest.approx(0.001)


TINY_DATA = {"calibration_blocks": 8, "block_len": 64, "eval_tokens": 512, "window": 64, "stride": 64}


def _measured_kl(model, data, steps, out, reference):
    from kompakt.recipe.runner import run_recipe
    from kompakt.recipe.schema import Recipe

    recipe = Recipe.from_dict({"model": model, "data": data, "metrics": ["kl"],
                               "steps": [{s.name: s.config} for s in steps]})  # fmt: skip
    return run_recipe(recipe, out, reference_dir=reference).records[-1]["metrics"]["kl_mean"]


def _predicted_and_measured(loaded, model: str, ids, data: dict, tmp_path, analysis: dict, attempts: dict):
    from kompakt.analyze.api import analyze
    from kompakt.auto.facts import add_analysis, model_facts

    facts = add_analysis(model_facts(loaded, forward_tps=1000.0), analyze(loaded, ids, **analysis))
    return {name: (quant_kl(facts, steps), _measured_kl(model, data, steps, tmp_path / name.replace(" ", "-"),
                                                        tmp_path / "reference"))
            for name, steps in attempts.items()}  # fmt: skip


def _check(results: dict, within: float) -> None:
    names = [n for n in ("rtn q8_0", "gptq q4_0", "rtn q4_0") if n in results]
    predicted = [results[n][0] for n in names]
    measured = [results[n][1] for n in names]
    assert predicted == sorted(predicted) and measured == sorted(measured), results  # the same ranking
    for name in {"rtn q4_0", "gptq q4_0"} & set(results):
        p, m = results[name]
        assert 1 / within <= m / p <= within, (name, results)


def test_prediction_error_on_a_tiny_model(tmp_path):
    """Measured / predicted stays within 3x for 4-bit RTN and GPTQ on the q4_0 grid, and the
    ranking of Q8_0 < GPTQ Q4_0 < RTN Q4_0 is the measured one. Measured when written: RTN Q8_0
    0.92x the prediction, RTN Q4_0 0.75x, GPTQ Q4_0 0.43x."""
    from kompakt.data import load_tokens
    from kompakt.model.tiny import save_tiny

    loaded = save_tiny("llama", tmp_path / "model")
    words = "the model runs on a small laptop and the data stays local while people read".split()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[(i + j) % len(words)] for j in range(14)) + "." for i in range(400)))
    settings = dict(n_blocks=4, block_len=64, eval_tokens=64, eval_window=64, group_size=32, reference_eval=False,
                    speed=False)  # fmt: skip
    attempts = {"rtn q8_0": [Step("quant.rtn", {"format": "q8_0"})], "rtn q4_0": [Step("quant.rtn", Q4)],
                "gptq q4_0": [Step("quant.gptq", {**Q4, "max_blocks": 8})]}  # fmt: skip
    ids = load_tokens(str(text), loaded).reshape(-1)
    data = {"calibration": str(text), **TINY_DATA}
    _check(_predicted_and_measured(loaded, str(tmp_path / "model"), ids, data, tmp_path, settings, attempts), 3.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_prediction_error_on_the_embedded_models(name, tmp_path, wikitext_test):
    """What compress --target --data plans from: the light analysis on the data's text (WikiText-2
    test; without --data it is self-generated text, the same code, but generating it took ~5 min of
    this test on a fresh machine for Gemma 3), measured against RTN on the q4_0 and q8_0 grids over
    2048 tokens held out from the end of that text (the sum-of-layers model; GPTQ's share is the
    bench's, not measured here: GPTQ alone takes ~9 min on Gemma 3). Measured / predicted: RTN
    Q4_0 0.70x (SmolLM2), 0.89x (Gemma 3); RTN Q8_0 0.73x and 0.98x (on self-generated text when
    first written: 0.90x, 0.96x; 0.99x, 0.45x). About 1.5 min for SmolLM2 and 3 for Gemma 3 on
    one core."""
    from kompakt.auto.api import ANALYSIS
    from kompakt.model.load import load
    from kompakt.recipe.rundata import RunData
    from kompakt.recipe.schema import DataSpec

    pytest.importorskip("torch")
    loaded = load(name)
    data = {"calibration": str(wikitext_test), "calibration_blocks": 8, "block_len": 512, "eval_tokens": 2048,
            "window": 512, "stride": 512}  # fmt: skip
    ids = RunData(DataSpec(**data), loaded, 0).calibration().reshape(-1)
    attempts = {"rtn q8_0": [Step("quant.rtn", {"format": "q8_0"})], "rtn q4_0": [Step("quant.rtn", Q4)]}
    results = _predicted_and_measured(loaded, name, ids, data, tmp_path, dict(ANALYSIS), attempts)
    print(name, results)
    _check(results, within=2.0)
