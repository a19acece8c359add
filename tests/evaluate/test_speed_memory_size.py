"""Speed, peak memory and size measurements on tiny models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.evaluate import disk_bytes, measure_speed, parameter_bytes, parameter_count, peak_rss
from kompakt.model.tiny import save_tiny, tiny_model

SMALL = dict(prompt_batch=2, prompt_len=32, gen_prompt_len=4, gen_tokens=4, repeats=1)


def test_speed_positive_and_threads_restored():
    loaded = tiny_model("llama")
    before = torch.get_num_threads()
    result = measure_speed(loaded, threads=1, **SMALL)
    assert result.prefill_tokens_per_s > 0 and result.generate_tokens_per_s > 0
    assert result.threads == 1
    assert result.device == "cpu" and "torch" in result.backend
    assert torch.get_num_threads() == before
    assert result.to_dict()["gen_tokens"] == 4


def test_speed_counts_the_batch_and_only_the_new_tokens(monkeypatch):
    """With a clock that moves 1 s per reading, each timing spans 1 s: prefill counts every
    prompt token of the batch (2 x 32), generation only the tokens made (4, not the prompt's)."""
    import types

    clock = iter(range(1000))
    monkeypatch.setattr("kompakt.evaluate.speed.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    result = measure_speed(tiny_model("llama"), threads=1, **SMALL)
    assert (result.prefill_tokens_per_s, result.generate_tokens_per_s) == (64.0, 4.0)


def test_speed_rejects_zero_threads():
    with pytest.raises(ConfigError):
        measure_speed(tiny_model("llama"), threads=0, **SMALL)


PEAK_SCRIPT = """
import torch
from kompakt.evaluate.memory import PeakMemory
with PeakMemory() as memory:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block += 1
    del block
print(memory.start_bytes, memory.peak_bytes)
"""


def test_peak_memory_sees_an_allocation():
    # A fresh process: in the long-lived test process freed memory that is still resident can
    # serve the allocation without raising the resident set (seen once in a full-suite run).
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    start, peak = map(int, done.stdout.split())
    assert peak >= start + 32 * 2**20
    result, peak = peak_rss(lambda: 7)
    assert result == 7 and peak > 0


def test_parameters_tied_counted_once():
    tied = tiny_model("gemma")  # tie_word_embeddings=True
    untied = tiny_model("llama")
    embed = tied.model.get_input_embeddings().weight
    assert tied.model.get_output_embeddings().weight is embed
    assert parameter_count(tied.model) == tied.num_parameters()
    assert parameter_count(tied.model) == sum(p.numel() for p in tied.model.parameters())
    assert parameter_count(untied.model) == untied.num_parameters()
    assert parameter_bytes(untied.model) == 4 * parameter_count(untied.model)
    assert parameter_bytes(untied.model.to(torch.bfloat16)) == 2 * parameter_count(untied.model)


def test_disk_bytes(tmp_path):
    save_tiny("llama", tmp_path)
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    config = (tmp_path / "config.json").stat().st_size
    assert disk_bytes(tmp_path) == weights + config
    assert disk_bytes(None) is None
    assert disk_bytes(tmp_path / "missing") is None
