"""lowrank.svd on the embedded SmolLM2 (two decoder layers, to stay within a couple of minutes):
the methods order svd-llm < asvd < plain in KL to the original, and the saved step reloads."""

from __future__ import annotations

import copy

import pytest
import torch

import kompakt
from kompakt.passes.base import PassContext, build_config, get_pass

LAYERS = ["model.layers.10.*", "model.layers.11.*"]  # 1/15 of the decoder Linear parameters


@pytest.mark.slow
def test_smollm2_methods_order_and_the_step_reloads(wikitext_test, tmp_path):
    from kompakt.data import sample_blocks, tokenize_texts
    from kompakt.evaluate import fidelity
    from kompakt.model.save import save_model

    dense = kompakt.load("smollm2-135m", device="cpu", dtype="float32")
    valid = (wikitext_test.parent / "wiki.valid.tokens").read_text(encoding="utf-8").replace(" <unk>", "")
    calib = sample_blocks(tokenize_texts([valid], dense.tokenizer), 4, 512, seed=0)
    ids = tokenize_texts([wikitext_test.read_text(encoding="utf-8")], dense.tokenizer)
    spec = get_pass("lowrank.svd")
    kl, results = {}, {}
    for method in ("plain", "asvd", "svd-llm"):
        ctx = PassContext(loaded=copy.deepcopy(dense), original=lambda: dense, calibration=lambda: calib)
        report = spec.apply(ctx, build_config(spec, {"method": method, "target_params": 0.03, "targets": LAYERS}))
        results[method] = report.loaded
        kl[method] = fidelity(dense, report.loaded, ids, window=512, stride=512, max_tokens=1024).kl_mean
    assert kl["svd-llm"] < kl["asvd"] < kl["plain"], kl
    save_model(results["svd-llm"], tmp_path / "step")
    back = kompakt.load(tmp_path / "step", device="cpu", dtype="float32")
    assert back.num_parameters() == results["svd-llm"].num_parameters() < dense.num_parameters()
    with torch.no_grad():
        expected = results["svd-llm"].model(input_ids=ids[None, :64]).logits
        torch.testing.assert_close(back.model(input_ids=ids[None, :64]).logits, expected)
