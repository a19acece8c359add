"""Exporting a factorized model (lowrank.svd): refused in one line without --merge, dense with it."""

from __future__ import annotations

import pytest
import torch

from kompakt.model.load import load
from kompakt.model.save import save_model
from kompakt.passes.base import PassContext, build_config, get_pass

IDS = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def factorized_dir(tiny_dir):
    loaded = load(tiny_dir, device="cpu")
    spec = get_pass("lowrank.svd")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: torch.zeros(1, 1))
    report = spec.apply(ctx, build_config(spec, {"method": "plain", "target_params": 0.3}))
    save_model(report.loaded, tiny_dir.parent / "factorized")
    return tiny_dir.parent / "factorized"


@pytest.mark.parametrize("format, why", [("gguf", "llama.cpp has no"), ("hf", "transformers cannot load")])
def test_without_merge_it_is_one_line_naming_merge(format, why, factorized_dir, cli):
    code, _, err = cli(["export", str(factorized_dir), "--format", format, "--out", "x", "--no-verify"])
    assert code == 2 and why in err and "--merge" in err and len(err.strip().splitlines()) == 1
    assert not (factorized_dir.parent / "x").exists()


def test_merge_writes_the_dense_equivalent_and_says_it_is_full_size(factorized_dir, tiny_dir, cli):
    code, out, _ = cli(["export", str(factorized_dir), "--format", "gguf", "--merge", "--out", "m.gguf",
                        "--no-verify"])  # fmt: skip
    assert code == 0 and "back to" in out and "full size" in out
    dense = (tiny_dir.parent / "m.gguf").stat().st_size
    code, _, _ = cli(["export", str(tiny_dir), "--format", "gguf", "--out", "d.gguf", "--no-verify"])
    assert code == 0 and dense == (tiny_dir.parent / "d.gguf").stat().st_size


def test_merged_hf_export_loads_in_plain_transformers_with_the_factorized_outputs(factorized_dir, cli):
    from transformers import AutoModelForCausalLM

    code, out, _ = cli(["export", str(factorized_dir), "--format", "hf", "--merge", "--out", "hf", "--no-verify"])
    assert code == 0 and "full size" in out
    plain = AutoModelForCausalLM.from_pretrained(factorized_dir.parent / "hf", dtype=torch.float32)
    factorized = load(factorized_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, factorized.model(input_ids=IDS).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
