"""share.layers: which depths share a block, exact recovery at full relaxation rank, one tensor per
shared weight (counted, trained, saved and reloaded once), healing with distill.kd, the export
refusal and `--merge`, and bad input (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors import safe_open

import kompakt
from kompakt.errors import ConfigError, KompaktError, ModelFormatError
from kompakt.evaluate.size import disk_bytes, parameter_count
from kompakt.model.arch import decoder_layers
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.relaxed import RelaxedLinear
from kompakt.model.save import save_model, weight_bytes
from kompakt.model.sharing import merged_dense, tie_layers
from kompakt.model.surgery import slice_linear
from kompakt.model.tiny import tiny_model
from kompakt.passes.base import PassContext, build_config, get_pass
from kompakt.passes.share_layers import INITS, ShareLayersConfig, _values, groups_for, stepwise_sources

IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(1))
LINEAR_PARAMS = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64  # one tiny llama layer's Linears: q, o; k, v; gate, up, down

pytestmark = pytest.mark.usefixtures("one_thread")


def _share(loaded: LoadedModel, **values) -> dict:
    spec = get_pass("share.layers")
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: CALIBRATION, seed=0)
    return spec.apply(ctx, build_config(spec, values)).details


def _logits(loaded: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def _q(loaded: LoadedModel, depth: int):
    return decoder_layers(loaded.model)[depth].self_attn.q_proj


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(600)) + "\n")
    return path


def test_which_depths_share_a_block():
    assert groups_for("cycle", 6, 3) == [[0, 3], [1, 4], [2, 5]]
    assert groups_for("repeat", 6, 3) == [[0, 1], [2, 3], [4, 5]]
    sources = stepwise_sources(30, 15)
    assert sources[0] == 0 and sources[-1] == 29 and len(set(sources)) == 15
    for n, k in ((30, 15), (30, 10), (24, 6), (8, 1)):  # with repeat, the kept layer is one of the block's own
        assert all(s in group for s, group in zip(stepwise_sources(n, k), groups_for("repeat", n, k), strict=True))


@pytest.mark.parametrize("init", ["average", "keep"])
def test_full_rank_relaxation_recovers_the_original(init):
    """B·A from the SVD of (original − shared) at full rank: every depth is its original layer again."""
    loaded = tiny_model("qwen2")  # q/k/v biases stay per depth
    reference = _logits(loaded)
    groups = groups_for("cycle", 4, 2)
    tie_layers(loaded, groups, _values(loaded, ShareLayersConfig(unique=2, init=init), groups, {})[0], relax_rank=64)
    assert isinstance(_q(loaded, 2), RelaxedLinear) and _q(loaded, 2).weight is _q(loaded, 0).weight
    torch.testing.assert_close(_logits(loaded), reference, rtol=0, atol=1e-4)


def test_regmean_starts_closer_to_the_original_than_the_papers_inits():
    """Fitted on the calibration inputs, the shared blocks and deltas reproduce the original's
    logits on other text of that kind better than Average or Stepwise with SVD deltas."""
    original = tiny_model("llama")
    reference = _logits(original)
    errors = {}
    for init in INITS:
        loaded = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name="tiny")
        details = _share(loaded, unique=2, pattern="repeat", init=init, relax_rank=4)
        errors[init] = float((_logits(loaded) - reference).square().mean())
    assert errors["regmean"] < 0.7 * min(errors["average"], errors["keep"]), errors
    assert "output_error" not in details  # the last, keep, fits nothing


def test_regmean_reports_the_output_energy_its_fit_misses():
    relaxed = _share(tiny_model("qwen2"), unique=2, pattern="cycle", init="regmean", relax_rank=2)
    assert set(relaxed["output_error"]) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    loaded = tiny_model("qwen2")
    plain = _share(loaded, unique=2, pattern="cycle", init="regmean", relax_rank=0)  # RegMean alone
    assert type(_q(loaded, 2)) is torch.nn.Linear and _q(loaded, 2).weight is _q(loaded, 0).weight
    for role, missed in relaxed["output_error"].items():
        assert 0 < missed < plain["output_error"][role] < 1, role  # the deltas take part of it back


def test_regmean_on_a_sentence_encoder_uses_its_padded_sentences():
    from kompakt.model.encode import embed
    from kompakt.model.inputs import pad_sentences
    from kompakt.model.tiny_encoder import tiny_encoder

    original = tiny_encoder("bert")
    sentences = ["a small model runs here", "the layer shares its weight", "text of the kind it reads", "one"]
    ids = original.tokenizer(sentences)["input_ids"]
    calibration = pad_sentences(sorted(ids, key=len, reverse=True), original.tokenizer.pad_token_id)
    reference, cosine = embed(original, sentences), {}
    for init in ("average", "regmean"):
        loaded = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name="tiny",
                             pooling=original.pooling)  # fmt: skip
        spec = get_pass("share.layers")
        ctx = PassContext(loaded=loaded, original=lambda: original, calibration=lambda: calibration, seed=0)
        spec.apply(ctx, build_config(spec, {"unique": 2, "init": init, "relax_rank": 2}))
        cosine[init] = float(torch.nn.functional.cosine_similarity(embed(loaded, sentences), reference).mean())
    assert cosine["regmean"] > cosine["average"], cosine


def test_plain_sharing_is_one_tensor_counted_once():
    loaded = tiny_model("llama")
    before = loaded.num_parameters()
    details = _share(loaded, unique=2, pattern="repeat", relax_rank=0)
    assert details["groups"] == [[0, 1], [2, 3]] and details["shared_tensors"] == 14
    assert _q(loaded, 1).weight is _q(loaded, 0).weight and _q(loaded, 2).weight is not _q(loaded, 0).weight
    assert type(_q(loaded, 1)) is torch.nn.Linear  # without relaxation the modules stay transformers' own
    saved = 2 * LINEAR_PARAMS
    assert loaded.num_parameters() == parameter_count(loaded.model) == before - saved
    assert weight_bytes(loaded) == 4 * (before - saved)


def test_save_load_keeps_the_ties_and_the_logits(tmp_path):
    original = tiny_model("llama")
    loaded = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name="tiny")
    _share(loaded, ratio=0.5, init="average", relax_rank=8)
    logits = _logits(loaded)
    save_model(original, tmp_path / "dense")
    save_model(loaded, tmp_path / "shared")
    reloaded = kompakt.load(tmp_path / "shared", device="cpu")
    torch.testing.assert_close(_logits(reloaded), logits, rtol=0, atol=1e-5)
    q0, q2 = _q(reloaded, 0), _q(reloaded, 2)
    assert isinstance(q2, RelaxedLinear) and q2.weight is q0.weight and q2.weight.data_ptr() == q0.weight.data_ptr()
    assert not torch.equal(q2.relax_a, q0.relax_a)  # each depth its own delta
    assert get_state(reloaded).shared == get_state(loaded).shared
    assert reloaded.num_parameters() == loaded.num_parameters() < original.num_parameters()
    with safe_open(str(tmp_path / "shared" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.layers.2.self_attn.q_proj.weight" not in keys
    assert "model.layers.2.self_attn.q_proj.relax_a" in keys
    assert disk_bytes(tmp_path / "shared") < disk_bytes(tmp_path / "dense")


def test_kd_trains_each_shared_tensor_once_and_saves_it(text, tmp_path):
    teacher = tiny_model("llama")
    student = LoadedModel(model=copy.deepcopy(teacher.model), tokenizer=teacher.tokenizer, name="tiny")
    _share(student, unique=2, relax_rank=4)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    spec = get_pass("distill.kd")
    ctx = PassContext(loaded=student, original=lambda: teacher, calibration=lambda: None, seed=0,
                      checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    values = {"data": str(text), "steps": 2, "seq_len": 32, "batch_size": 2, "checkpoint_every": 1, "lr": 1e-3}
    spec.apply(ctx, build_config(spec, values))
    checkpoint = next((tmp_path / "ckpt").iterdir())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]
    unique = list(student.model.parameters())  # each shared tensor once
    assert len(optimizer["state"]) == len(unique) == sum(len(g["params"]) for g in optimizer["param_groups"])
    with safe_open(str(checkpoint / "trainable.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(unique)
    assert _q(student, 2).weight is _q(student, 0).weight  # still one tensor after the optimizer steps
    assert not torch.equal(_q(student, 0).weight, before["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(_q(student, 2).relax_b, before["model.layers.2.self_attn.q_proj.relax_b"])
    save_model(student, tmp_path / "healed")
    torch.testing.assert_close(_logits(kompakt.load(tmp_path / "healed", device="cpu")), _logits(student),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_export_refuses_shared_layers_and_merge_writes_the_dense_equivalent(cli, tmp_path):
    loaded = tiny_model("llama")
    _share(loaded, unique=2, relax_rank=4)
    for fmt in ("gguf", "hf"):
        with pytest.raises(ConfigError, match="--merge") as error:
            kompakt.export(loaded, format=fmt, out=tmp_path / f"out-{fmt}")
        assert "\n" not in str(error.value) and not (tmp_path / f"out-{fmt}").exists()
    save_model(loaded, tmp_path / "shared")
    code, _, err = cli(["export", str(tmp_path / "shared"), "--out", str(tmp_path / "m.gguf")])
    assert code == 2 and "--merge" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("m.gguf*"))
    dense = merged_dense(loaded)
    assert not get_state(dense).shared and get_state(loaded).shared  # the shared model is untouched
    assert type(_q(dense, 2)) is torch.nn.Linear and _q(dense, 2).weight is not _q(dense, 0).weight
    assert dense.num_parameters() == tiny_model("llama").num_parameters()
    torch.testing.assert_close(_logits(dense), _logits(loaded), rtol=0, atol=1e-5)
    result = kompakt.export(loaded, format="hf", out=tmp_path / "merged", merge=True)
    assert result.check is not None and not result.check.failed and "full size" in result.notes[0]


def test_a_record_naming_an_unknown_module_refuses_to_load(tmp_path):
    loaded = tiny_model("llama")
    _share(loaded, unique=2, relax_rank=0)
    save_model(loaded, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    owner = next(iter(config["kompakt_shared"]))
    config["kompakt_shared"][owner]["users"] = ["model.layers.2.mlp.fancy_proj"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="not a Linear of this model") as error:
        kompakt.load(tmp_path / "m", device="cpu")
    assert "\n" not in str(error.value)


def _per_layer_widths(loaded: LoadedModel) -> LoadedModel:
    """Layer 1 with a narrower MLP (as per-layer width pruning would leave it)."""
    mlp = decoder_layers(loaded.model)[1].mlp
    keep = torch.arange(96)
    slice_linear(mlp.gate_proj, rows=keep)
    slice_linear(mlp.up_proj, rows=keep)
    slice_linear(mlp.down_proj, cols=keep)
    return loaded


@pytest.mark.parametrize("values, needle", [
    ({"unique": 3}, "does not divide 4 layers; choose one of 1, 2"),
    ({"unique": 4}, "choose 1 to 3 unique blocks"),
    ({"unique": 6}, "choose 1 to 3 unique blocks"),
    ({"ratio": 0.75}, "does not divide 4 layers"),
    ({"unique": 2, "relax_rank": 64}, "lower relax_rank"),
])  # fmt: skip
def test_impossible_counts_are_refused_before_any_change(values, needle):
    loaded = tiny_model("llama")
    reference = _logits(loaded)
    with pytest.raises(ConfigError, match=needle) as error:
        _share(loaded, **values)
    assert "\n" not in str(error.value)
    assert not get_state(loaded).shared and torch.equal(_logits(loaded), reference)


@pytest.mark.parametrize("values, needle", [
    ({"unique": 2, "init": "median"}, "unknown init 'median'; valid inits: regmean, average, keep"),
    ({"unique": 2, "pattern": "zigzag"}, "unknown pattern 'zigzag'"),
    ({"unique": 2, "ratio": 0.5}, "exactly one of unique or ratio"),
    ({"ratio": 1.5}, "ratio must be in (0, 1)"),
])  # fmt: skip
def test_bad_config_is_one_line(values, needle):
    with pytest.raises(ConfigError) as error:
        build_config(get_pass("share.layers"), values)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_layers_of_different_shapes_and_a_second_share_are_refused():
    loaded = _per_layer_widths(tiny_model("llama"))
    with pytest.raises(ConfigError, match="layers 1 and 3 differ in shape .* before per-layer width pruning"):
        _share(loaded, unique=2, pattern="cycle", relax_rank=0)
    assert not get_state(loaded).shared and _q(loaded, 3).weight is not _q(loaded, 1).weight
    shared = tiny_model("llama")
    _share(shared, unique=2, relax_rank=0)
    with pytest.raises(KompaktError, match="already shares layers"):
        _share(shared, unique=1, relax_rank=0)


def test_cli_bad_count_exits_2_and_writes_no_step(cli, text, tmp_path):
    from kompakt.model.tiny import save_tiny

    save_tiny("llama", tmp_path / "model")
    code, _, err = cli(["compress", str(tmp_path / "model"), "--step", "share.layers:unique=3", "--data", str(text),
                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2 and "does not divide 4 layers" in err and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / "run" / "steps").iterdir())  # no step directory, complete or half-written


@pytest.mark.parametrize("name, values", [
    ("prune.depth", {"count": 1, "method": "last"}),
    ("prune.width", {"mlp_channels": 64}),
    ("quant.rtn", {"bits": 4, "group_size": 32}),
])  # fmt: skip
def test_passes_that_would_break_the_ties_refuse_a_shared_model(name, values):
    loaded = tiny_model("llama")
    _share(loaded, unique=2, relax_rank=0)
    spec = get_pass(name)
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: torch.randint(3, 250, (4, 32)),
                      seed=0)  # fmt: skip
    with pytest.raises(ConfigError, match="share.layers") as error:
        spec.apply(ctx, build_config(spec, values))
    assert "\n" not in str(error.value) and _q(loaded, 2).weight is _q(loaded, 0).weight


@pytest.mark.slow
def test_smollm2_30_layers_to_15_blocks_round_trip(tmp_path):
    """The embedded model: exact parameter arithmetic, and save -> load gives the same logits with
    the ties rebuilt (one storage per shared tensor) at about 64 % of the dense bytes."""
    loaded = kompakt.load("smollm2-135m", device="cpu", dtype="float32")
    before = loaded.num_parameters()
    save_model(loaded, tmp_path / "dense")
    _share(loaded, unique=15, init="average", relax_rank=16)  # regmean's fit is timed by bench/share_layers.py
    per_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576  # q, o; k, v; gate, up, down
    deltas = 30 * 16 * (2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576))
    assert loaded.num_parameters() == before - 15 * per_layer + deltas
    save_model(loaded, tmp_path / "shared")
    reloaded = kompakt.load(tmp_path / "shared", device="cpu", dtype="float32")
    torch.testing.assert_close(_logits(reloaded), _logits(loaded), rtol=0, atol=1e-4)
    assert _q(reloaded, 15).weight.data_ptr() == _q(reloaded, 0).weight.data_ptr()
    assert reloaded.num_parameters() == loaded.num_parameters()
    assert disk_bytes(tmp_path / "shared") < 0.7 * disk_bytes(tmp_path / "dense")


def test_merging_a_shared_encoder_keeps_its_pooling():
    """export --merge of a shared sentence encoder writes its sentence-transformers files too."""
    from kompakt.model.tiny_encoder import tiny_encoder

    loaded = tiny_encoder("bert")
    _share(loaded, unique=2, init="average", relax_rank=0)
    dense = merged_dense(loaded)
    assert dense is not loaded and dense.is_encoder and dense.pooling == loaded.pooling
