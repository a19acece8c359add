"""Streaming evaluation (kompakt.evaluate.streamed): a lazily opened model run layer by layer over
all windows gives the in-memory perplexity, KL and top-1 (1e-6 relative: the same operations in
the same order, so in practice equal to the last bit on CPU fp32)."""

from __future__ import annotations

import pytest
import torch

from kompakt.evaluate.fidelity import fidelity
from kompakt.evaluate.perplexity import perplexity
from kompakt.evaluate.streamed import streamed_fidelity, streamed_perplexity
from kompakt.model.lazy import open_lazy
from kompakt.model.load import load
from kompakt.model.tiny import save_tiny

IDS = torch.randint(3, 261, (400,), generator=torch.Generator().manual_seed(0))
REL = 1e-6


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3", "gemma3_text"])
def test_streamed_perplexity_is_the_in_memory_perplexity(family, tmp_path):
    save_tiny(family, tmp_path / "m")
    memory = perplexity(load(tmp_path / "m", device="cpu", dtype="float32"), IDS, window=64, stride=48, batch_size=3)
    lazy = open_lazy(tmp_path / "m")
    streamed = streamed_perplexity(lazy, IDS, window=64, stride=48, batch_size=3)
    assert streamed.tokens_scored == memory.tokens_scored and _close(streamed.ppl, memory.ppl)
    # Never more than one decoder layer besides embedding, final norm and head.
    outside = sum(e.numel for n, e in lazy.tensors.items() if not n.startswith(lazy.spec.layers + "."))
    layer = max(lazy.layer_bytes(i, torch.float32) // 4 for i in range(lazy.n_layers))
    assert lazy.peak_numel <= outside + layer and lazy.live_numel == 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_streamed_kl_is_the_in_memory_kl(family, tmp_path):
    save_tiny(family, tmp_path / "ref", seed=0)
    save_tiny(family, tmp_path / "cand", seed=1)
    reference = load(tmp_path / "ref", device="cpu", dtype="float32")
    candidate = load(tmp_path / "cand", device="cpu", dtype="float32")
    memory = fidelity(reference, candidate, IDS, window=64, stride=64, batch_size=2)
    # Both streamed, then a streamed reference against a loaded candidate.
    for cand in (open_lazy(tmp_path / "cand"), candidate):
        streamed = streamed_fidelity(open_lazy(tmp_path / "ref"), cand, IDS, work_dir=tmp_path, window=64, stride=64,
                                     batch_size=2)  # fmt: skip
        assert streamed.tokens == memory.tokens
        for field in ("kl_mean", "kl_p99", "top1", "ppl_reference", "ppl_candidate"):
            assert _close(getattr(streamed, field), getattr(memory, field)), field
    assert memory.kl_mean > 0.01  # different seeds: the comparison is not between equal models
    assert not list(tmp_path.glob("*.f32"))  # the reference's log-probs are removed after


def test_cli_eval_over_the_budget_streams_and_gives_the_in_memory_numbers(tmp_path, cli):
    import json

    save_tiny("llama", tmp_path / "ref", seed=0)
    save_tiny("llama", tmp_path / "cand", seed=1)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["eval", str(tmp_path / "cand"), "--reference", str(tmp_path / "ref"), "--data", str(text),
              "--window", "64", "--no-speed", "--json"]  # fmt: skip
    code, out, err = cli(common)
    assert code == 0, err
    memory = json.loads(out)
    code, out, err = cli([*common, "--max-memory", "100KB"])
    assert code == 0, err
    streamed = json.loads(out)
    for key in ("ppl", "kl_mean", "top1", "ppl_reference", "tokens_scored"):
        assert _close(streamed[key], memory[key]), key
    code, _, err = cli(["eval", str(tmp_path / "cand"), "--max-memory", "100KB", "--no-speed"])
    assert code == 2 and "give --data" in err and len(err.strip().splitlines()) == 1


def test_a_packed_quantized_result_larger_than_the_budget_is_evaluated_layer_by_layer(tmp_path):
    """`kompakt eval RUN/final --max-memory`: a GPTQ result stored packed (compressed-tensors) is
    opened lazily and dequantized layer by layer, with the perplexity of loading it whole."""
    from kompakt.evaluate.api import is_streamed, open_within
    from kompakt.passes.base import PassContext, build_config, get_pass
    from kompakt.rundir.stepsave import save_step_model

    save_tiny("llama", tmp_path / "m")
    loaded = load(tmp_path / "m", device="cpu", dtype="float32")
    spec, blocks = get_pass("quant.gptq"), IDS[:96].reshape(4, 24)
    report = spec.apply(PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: blocks),
                        build_config(spec, {"bits": 4, "group_size": 32}))  # fmt: skip
    save_step_model(report.loaded, tmp_path / "q", loaded.storage_dtype, report.packed_layers)
    streamed = open_within(tmp_path / "q", max_memory="1KB")
    assert is_streamed(streamed) and not is_streamed(open_within(tmp_path / "q", max_memory="100GB"))
    whole = perplexity(load(tmp_path / "q", device="cpu", dtype="float32"), IDS, window=64, stride=48, batch_size=3)
    lazy = streamed_perplexity(open_lazy(tmp_path / "q"), IDS, window=64, stride=48, batch_size=3)
    assert _close(lazy.ppl, whole.ppl)
