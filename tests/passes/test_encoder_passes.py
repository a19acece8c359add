"""Compression passes on sentence encoders (tiny BERT-family models built in code).

The contract (every pass x every tiny encoder: runs or refuses in one line, save -> reload gives
the same embeddings) is tests/passes/test_pass_contract.py; here: what each encoder path must do.
Padded calibration sentences give the statistics of the sentences alone (padding never counts);
prune.depth's cosine score finds a layer that does nothing and every_other keeps 0, 2, 4, ...;
prune.width cuts MLP channels and refuses heads where the head size is hidden / heads; GPTQ
beats RTN on the embeddings; the runner refuses a decoder-only step before writing anything.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel

import kompakt
from kompakt.calib import capture_layer_inputs, collect_stats
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, linear_modules, text_config
from kompakt.model.encode import embed
from kompakt.model.inputs import pad_sentences
from kompakt.model.loaded import LoadedModel
from kompakt.model.save import save_model
from kompakt.model.tiny import TINY_ENCODERS, tiny_encoder, tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass

SENTENCES = [
    "the cat sat on the mat.", "a small model runs on a laptop, fast and quiet.", "tokens go in.",
    "weights are rounded to a grid of sixteen values per group of columns.", "layers can be skipped.",
    "what is lost is measured, never assumed.", "search and retrieval use embeddings.", "hello world!",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(loaded: LoadedModel, sentences=SENTENCES):
    ids = loaded.tokenizer(sentences)["input_ids"]
    return pad_sentences(sorted(ids, key=len, reverse=True), loaded.tokenizer.pad_token_id)


def _copy(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(model=copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, name=loaded.name,
                       pooling=loaded.pooling)  # fmt: skip


def _run(name: str, loaded: LoadedModel, calibration=None, **values):
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: calibration, seed=0)
    return spec.apply(ctx, build_config(spec, values))


def _cosine(a: LoadedModel, b: LoadedModel) -> float:
    return float(torch.nn.functional.cosine_similarity(embed(a, SENTENCES), embed(b, SENTENCES)).mean())


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_padded_sentences_give_the_statistics_of_the_sentences_alone(family):
    """A Hessian from a padded batch equals the one from each sentence run on its own (no padding):
    the layer gets each batch's own mask, and padded positions never enter the statistics."""
    loaded = tiny_encoder(family)
    layers, spec = decoder_layers(loaded.model), arch_for(loaded.model)
    role = "mlp.down"
    module = linear_modules(layers[1], spec)[role]

    def hessian(batch, batch_size):
        captured = capture_layer_inputs(loaded.model, batch, batch_size=batch_size)
        inputs = captured.hidden
        from kompakt.calib.capture import run_layer

        inputs = run_layer(layers[0], 0, captured, inputs)
        stats = collect_stats(layers[1], 1, captured, inputs, {role: module})
        return stats[role].hessian(), stats[role].n_samples

    padded, tokens = hessian(_batch(loaded), 3)
    singles = [_batch(loaded, [s]) for s in SENTENCES]
    alone = [hessian(single, 1) for single in singles]
    n = sum(count for _, count in alone)
    assert tokens == n == _batch(loaded).tokens
    expected = sum(h * count for h, count in alone) / n
    torch.testing.assert_close(padded, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- prune.depth


def _make_identity(loaded: LoadedModel, index: int) -> None:
    """Zero the attention's and MLP's output projections (weights and biases) of one layer. A
    pre-LN layer (ModernBERT) is then the identity; a post-LN one (BERT) is LayerNorm(x), which
    is x for the tiny models' unit LayerNorms on already normalised inputs."""
    spec = arch_for(loaded.model)
    layer = decoder_layers(loaded.model)[index]
    with torch.no_grad():
        for path in (spec.o, spec.down):
            module = get_submodule(layer, path)
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()


@pytest.mark.parametrize("family", TINY_ENCODERS)
def test_cosine_removes_the_layer_that_does_nothing(family):
    loaded = tiny_encoder(family)
    _make_identity(loaded, 2)
    report = _run("prune.depth", loaded, _batch(loaded), count=1, method="cosine")
    scores = report.details["rounds"][0]["scores"]
    assert report.details["removed_layers"] == [2], scores
    assert scores[2] < 1e-6 and scores[2] < min(scores[:2] + scores[3:]) / 10, scores


def test_iterative_cosine_rescores_the_smaller_model():
    loaded = tiny_encoder("roberta")
    for index in (0, 3):
        _make_identity(loaded, index)
    report = _run("prune.depth", loaded, _batch(loaded), count=2, method="cosine", iterative=True)
    assert report.details["removed_layers"] == [0, 3]
    assert [len(r["scores"]) for r in report.details["rounds"]] == [4, 3]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_every_other_keeps_even_layers_and_reloads(family, tmp_path):
    original = tiny_encoder(family)
    loaded = _copy(original)
    kept = [copy.deepcopy(decoder_layers(original.model)[i]).state_dict() for i in (0, 2)]
    report = _run("prune.depth", loaded, select="every_other")
    assert report.details["removed_layers"] == [1, 3]
    model = report.loaded.model
    assert text_config(model).num_hidden_layers == 2  # DistilBERT: n_layers through its attribute map
    for layer, state in zip(decoder_layers(model), kept):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[key]), key
    save_model(report.loaded, tmp_path / "half")
    plain = AutoModel.from_pretrained(tmp_path / "half")
    assert len(decoder_layers(plain)) == 2
    torch.testing.assert_close(embed(kompakt.load(tmp_path / "half"), SENTENCES), embed(report.loaded, SENTENCES))


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"select": "every_other", "method": "cosine"}, "chooses the layers itself"),
        ({"select": "every_other", "count": 1}, "removes 2 of 4 layers, not 1"),
        ({"count": 1, "method": "kl"}, "use method: cosine"),
    ],
)
def test_encoder_depth_refusals(values, needle):
    with pytest.raises(ConfigError, match=needle):
        _run("prune.depth", tiny_encoder("bert"), _batch(tiny_encoder("bert")), **values)


def test_cosine_is_refused_on_a_decoder():
    with pytest.raises(ConfigError, match="use method: kl"):
        _run("prune.depth", tiny_model("llama"), torch.zeros(2, 8, dtype=torch.long), count=1, method="cosine")


# --------------------------------------------------------------------------- prune.width


@pytest.mark.parametrize("family", ["distilbert", "modernbert"])
def test_mlp_channels_are_cut_and_reload(family, tmp_path):
    loaded = tiny_encoder(family)
    report = _run("prune.width", loaded, _batch(loaded), mlp_fraction=0.5)
    key = arch_for(loaded.model).intermediate_key
    assert getattr(text_config(report.loaded.model), key) == 64
    save_model(report.loaded, tmp_path / "narrow")
    reloaded = kompakt.load(tmp_path / "narrow")
    assert getattr(reloaded.model.config, key) == 64
    torch.testing.assert_close(embed(reloaded, SENTENCES), embed(report.loaded, SENTENCES))


@pytest.mark.parametrize("values", [{"heads_fraction": 0.5}, {"hidden_fraction": 0.25}, {"target_params": 0.7}])
def test_heads_and_hidden_are_refused_where_head_size_is_hidden_over_heads(values):
    loaded = tiny_encoder("bert")
    before = copy.deepcopy(loaded.model.state_dict())
    with pytest.raises(ConfigError, match=r"head size as hidden_size / num_attention_heads.*mlp_fraction"):
        _run("prune.width", loaded, _batch(loaded), **values)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


# --------------------------------------------------------------------------- quantization


def test_gptq_beats_rtn_on_the_embeddings():
    original = tiny_encoder("bert")
    calibration = _batch(original, SENTENCES * 4)
    rtn = _run("quant.rtn", _copy(original), bits=4, group_size=32).loaded
    gptq = _run("quant.gptq", _copy(original), calibration, bits=4, group_size=32).loaded
    assert 1 - _cosine(gptq, original) < 1 - _cosine(rtn, original)


# --------------------------------------------------------------------------- the runner


def test_runner_refuses_a_decoder_only_step_before_writing(tmp_path):
    from kompakt.model.tiny import save_tiny_encoder

    save_tiny_encoder("bert", tmp_path / "enc")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES * 10) + "\n")
    recipe = kompakt.Recipe.from_dict({
        "model": str(tmp_path / "enc"), "data": {"calibration": str(data), "calibration_blocks": 8},
        "steps": [{"quant.rtn": {"bits": 8}}, {"quant.awq": {"bits": 4}}],
    })  # fmt: skip
    from kompakt.recipe.runner import run_recipe

    with pytest.raises(ConfigError, match=r"^quant.awq does not run on sentence encoders .*post-LN.*quant.gptq"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_decoder_only_pass_in_one_line(tmp_path, capsys):
    from kompakt.cli.app import main
    from kompakt.model.tiny import save_tiny_encoder

    save_tiny_encoder("distilbert", tmp_path / "enc")
    with pytest.raises(SystemExit) as done:
        main(["compress", str(tmp_path / "enc"), "--step", "finetune.lora", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1, err
    assert "finetune.lora does not run on sentence encoders" in err and "next-token" in err
    assert not (tmp_path / "run").exists()
