"""Measured llama.cpp speed per candidate shape, cached by shape (kompakt.auto.search.latency)."""

from __future__ import annotations

import json

import pytest

from kompakt.auto.search.latency import measure_latency, shape_key
from kompakt.model.tiny import tiny_model

pytest.importorskip("llama_cpp")


def test_speed_is_measured_once_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path))
    loaded = tiny_model("llama")
    first = measure_latency(loaded, threads=1)
    assert "error" not in first, first
    assert first["generate_tps"] > 0 and first["prefill_tps"] > 0 and first["cached"] is False
    again = measure_latency(tiny_model("llama", seed=1), threads=1)  # other weights, same shape
    assert again["cached"] is True and again["generate_tps"] == first["generate_tps"]
    shallower = tiny_model("llama", num_hidden_layers=2)
    assert shape_key(shallower, 1) != shape_key(loaded, 1)
    assert measure_latency(shallower, threads=1)["cached"] is False
    cache = json.loads((tmp_path / "search" / "latency.json").read_text())
    assert len(cache) == 2 and all(json.loads(key)["type"] == "f16" for key in cache)
