"""`--target params=F,speed=Nx`: the candidates are the shapes llama.cpp times at the factor
(kompakt.auto.search.speed). The selection rules run on a stated speed law; the timing itself is
llama.cpp's, once on a real shape and once end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from kompakt.auto.search.latency import shape_key
from kompakt.auto.search.shapes import Shape, candidates
from kompakt.auto.search.speed import MEASURE_PER_CANDIDATE, fast_enough, shape_model
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for
from kompakt.model.tiny import save_tiny, tiny_model


@pytest.fixture(scope="module")
def spread():
    loaded = tiny_model("llama", num_hidden_layers=8)
    origin, ordered = candidates(loaded, 0.5, count=10**6)
    return loaded, origin, ordered, arch_for(loaded).intermediate_key


def by_layers(timed: list):
    """A speed law for the selection logic: tokens/s inversely proportional to the layer count
    (what a memory-bound decoder of fixed width does), recorded so the test sees what was timed."""

    def measure(loaded) -> dict:
        layers = loaded.model.config.num_hidden_layers
        timed.append(layers)
        return {"generate_tps": 800.0 / layers, "prefill_tps": 1.0}

    return measure


def test_shape_model_has_the_shape_the_cut_will_have(spread):
    loaded, origin, ordered, key = spread
    for shape in ordered[:3]:
        built = shape_model(loaded, origin, shape, key)
        assert built.num_parameters() == shape.params  # the exact count the search planned
        assert json.loads(shape_key(built, 1))["num_hidden_layers"] == shape.layers
    whole = Shape(origin.layers, origin.hidden, origin.intermediate, origin.kv_groups, origin.heads, origin.params)
    assert shape_key(shape_model(loaded, origin, whole, key), 1) == shape_key(loaded, 1)  # one cache entry per shape


def test_only_shapes_at_the_factor_are_kept_and_slower_ones_prune_the_rest(spread):
    loaded, origin, ordered, key = spread
    timed: list[int] = []
    chosen, latency, base = fast_enough(loaded, origin, ordered, 3, 1.5, key, by_layers(timed))
    assert base == 100.0 and timed[0] == 8  # the original is timed first
    assert chosen and all(s.layers <= 5 for s in chosen) and len(chosen) <= 3  # 8 / 5 layers = 1.6x
    assert all(latency[s.key]["speedup"] >= 1.5 for s in chosen)
    assert len(latency) <= MEASURE_PER_CANDIDATE * 3 and len(timed) == len(latency) + 1
    order = list(latency)  # in the order they were timed
    for i, later in enumerate(order):  # a shape no smaller than one already too slow is never timed
        slow = [k for k in order[:i] if latency[k]["speedup"] < 1.5]
        assert not any(all(a <= b for a, b in zip(k, later)) for k in slow)
    assert any(latency[k]["speedup"] < 1.5 for k in order)  # the test saw the rule at work


def test_an_unreachable_factor_is_one_line_naming_the_fastest(spread):
    loaded, origin, ordered, key = spread
    with pytest.raises(ConfigError, match=r"reaches speed=9x .* the fastest of \d+ timed is \d\.\d\dx") as error:
        fast_enough(loaded, origin, ordered, 2, 9.0, key, by_layers([]))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="install llama-cpp-python or drop speed="):
        fast_enough(loaded, origin, ordered, 2, 2.0, key, lambda _: {"error": "probe failed: no llama_cpp"})


def test_cli_speed_target_refusals_before_any_file(tmp_path, cli, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    save_tiny("llama", tmp_path / "model")
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    base = ["search", str(tmp_path / "model"), "--data", str(tmp_path / "calib.txt"), "--candidates", "1"]
    code, _, err = cli([*base, "--target", "params=0.5,speed=2x", "--no-latency", "--out", str(tmp_path / "a")])
    assert code == 2 and "drop --no-latency" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli([*base, "--target", "params=0.5,speed=16x", "--out", str(tmp_path / "b")])  # real llama.cpp timings
    assert code == 2 and "reaches speed=16x" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
