"""Surgery on every tiny family: forward works, exact parameter change, save -> reload same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, text_config
from kompakt.model.save import save_model
from kompakt.model.surgery import drop_layers, shrink_heads, shrink_hidden, shrink_mlp
from kompakt.model.tiny import TINY_FAMILIES, tiny_model

IDS = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _layer_params(loaded) -> int:
    return sum(p.numel() for p in decoder_layers(loaded.model)[0].parameters())


def _expected_drop(loaded) -> int:
    return 2 * _layer_params(loaded)


def _expected_mlp(loaded) -> int:  # 64 of 128 channels removed: gate + up rows, down columns
    config = text_config(loaded)
    return config.num_hidden_layers * 64 * 3 * config.hidden_size


def _expected_heads(loaded) -> int:  # one of two KV groups: 1 KV head, 2 query heads (head_dim 16)
    config, spec = text_config(loaded), arch_for(loaded.model)
    per_layer = (2 * 16 + 2 * 16) * config.hidden_size + 2 * 16 * config.hidden_size  # q, k, v rows; o cols
    if get_submodule(decoder_layers(loaded.model)[0], spec.q or spec.qkv).bias is not None:
        per_layer += 2 * 16 + 2 * 16  # q, k, v biases (Qwen2)
    return config.num_hidden_layers * per_layer


def _expected_hidden(loaded) -> int:  # 32 of 64 hidden channels removed
    config, model, spec = text_config(loaded), loaded.model, arch_for(loaded.model)
    removed = 32
    tied = get_submodule(model, spec.lm_head).weight is get_submodule(model, spec.embed).weight
    per_layer_norms = sum(1 for role in spec.norm_paths if role not in ("attn.q_norm", "attn.k_norm"))
    q_out, kv_out = 4 * 16, 2 * 16
    linear_width = q_out + 2 * kv_out + 2 * config.intermediate_size  # q/k/v/gate/up input columns
    linear_width += q_out + config.intermediate_size  # o/down output rows
    per_layer = removed * (per_layer_norms + linear_width)
    projector = sum(model.get_parameter(path).shape[0] for path in spec.hidden_outputs)  # a column each
    embeddings = removed * config.vocab_size * (1 if tied else 2)
    return embeddings + removed * (1 + projector) + config.num_hidden_layers * per_layer


EDITS = {
    "drop_layers": (lambda m: drop_layers(m, [1, 2]), _expected_drop),
    "shrink_mlp": (lambda m: shrink_mlp(m, torch.arange(0, 128, 2)), _expected_mlp),
    "shrink_heads": (lambda m: shrink_heads(m, [torch.tensor([1])] * 4), _expected_heads),
    "shrink_hidden": (lambda m: shrink_hidden(m, torch.arange(1, 64, 2)), _expected_hidden),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edit_forward_params_and_reload(family, edit, tmp_path):
    loaded = tiny_model(family)
    apply, expected = EDITS[edit]
    removed = expected(loaded)
    before = loaded.num_parameters()
    same, changes = apply(loaded)
    assert same is loaded
    assert changes["parameters"] == [before, before - removed]
    assert loaded.num_parameters() == before - removed
    logits = _logits(loaded.model)
    assert logits.shape == (2, 12, text_config(loaded).vocab_size) and torch.isfinite(logits).all()
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(loaded, tmp_path / "m"))
    torch.testing.assert_close(_logits(reloaded), logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_drop_layers_keeps_kv_cache_generation_working(family):
    loaded = tiny_model(family)
    drop_layers(loaded, [0, 2])
    idx = [m.layer_idx for m in loaded.model.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
    assert sorted(set(idx)) == [0, 1]
    prompt = IDS[:1, :6]
    cached = loaded.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
    tokens = prompt
    for _ in range(6):  # reference: no cache, full recompute each step
        next_token = _logits(loaded.model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(cached, tokens)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_drop_layers_keeps_remaining_layer_types(family):
    loaded = tiny_model(family)
    types = list(loaded.model.config.layer_types)
    drop_layers(loaded, [0])
    assert loaded.model.config.layer_types == types[1:]
    assert loaded.model.config.num_hidden_layers == 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dropping_an_identity_layer_keeps_logits(family):
    loaded = tiny_model(family)
    spec = arch_for(loaded.model)
    layer = decoder_layers(loaded.model)[2]
    for path in (spec.o, spec.down):  # the block now adds nothing to the residual stream
        get_submodule(layer, path).weight.data.zero_()
    before = _logits(loaded.model)
    drop_layers(loaded, [2])
    torch.testing.assert_close(_logits(loaded.model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_removing_dead_mlp_channels_keeps_logits(family):
    """shrink_mlp keeps the right rows and columns (fused gate_up included): the odd channels,
    made dead first (their down_proj columns zeroed), go without changing the logits."""
    loaded = tiny_model(family)
    spec = arch_for(loaded.model)
    for layer in decoder_layers(loaded.model):
        get_submodule(layer, spec.down).weight.data[:, 1::2] = 0
    before = _logits(loaded.model)
    shrink_mlp(loaded, torch.arange(0, text_config(loaded).intermediate_size, 2))
    torch.testing.assert_close(_logits(loaded.model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_removing_a_dead_kv_group_keeps_logits(family):
    """shrink_heads keeps the query heads of the kept KV group with their K and V (fused qkv
    included): KV group 0's query heads, made dead first (their o_proj columns zeroed), go with
    their group without changing the logits."""
    loaded = tiny_model(family)
    config, spec = text_config(loaded), arch_for(loaded.model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads * head_dim  # o_proj columns per KV group
    layers = decoder_layers(loaded.model)
    for layer in layers:
        get_submodule(layer, spec.o).weight.data[:, :group] = 0
    before = _logits(loaded.model)
    shrink_heads(loaded, [torch.tensor([1])] * len(layers))
    torch.testing.assert_close(_logits(loaded.model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_shrink_hidden_preserves_kept_embedding_values(family):
    loaded = tiny_model(family)
    embed = get_submodule(loaded.model, arch_for(loaded.model).embed)
    keep = torch.arange(0, 64, 2)
    with torch.no_grad():
        before = embed(IDS)[..., keep]
        shrink_hidden(loaded, keep)
        torch.testing.assert_close(embed(IDS), before)


def test_shrink_heads_keeps_head_dim_explicit():
    loaded = tiny_model("llama")
    shrink_heads(loaded, [0])
    config = loaded.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)


def test_per_layer_indices_may_differ():
    loaded = tiny_model("llama")
    keeps = [torch.arange(0, 64), torch.arange(64, 128), torch.arange(32, 96), torch.arange(0, 128, 2)]
    gate = [get_submodule(layer, "mlp.gate_proj").weight.data.clone() for layer in decoder_layers(loaded.model)]
    shrink_mlp(loaded, keeps)
    for layer, keep, old in zip(decoder_layers(loaded.model), keeps, gate, strict=True):
        torch.testing.assert_close(get_submodule(layer, "mlp.gate_proj").weight.data, old[keep])


def test_width_transformers_rejects_is_a_config_error_before_any_edit():
    loaded = tiny_model("llama")  # Llama configs need hidden_size % num_attention_heads == 0
    with pytest.raises(ConfigError, match="not a multiple of the number of attention heads"):
        shrink_hidden(loaded, torch.arange(30))
    assert loaded.model.config.hidden_size == 64
    assert loaded.num_parameters() == tiny_model("llama").num_parameters()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: drop_layers(m, range(4)), "cannot remove all"),
        (lambda m: drop_layers(m, [4]), "out of range"),
        (lambda m: shrink_heads(m, []), "cannot remove every KV group"),
        (lambda m: shrink_heads(m, [2]), "out of range"),
        (lambda m: shrink_mlp(m, [torch.arange(3)] * 3 + [torch.arange(4)]), "same number"),
        (lambda m: shrink_mlp(m, [torch.arange(3)] * 3), "one per layer"),
        (lambda m: shrink_hidden(m, [0, 0, 1]), "duplicate"),
        (lambda m: shrink_hidden(m, []), "cannot remove every hidden channel"),
    ],
)
def test_bad_edits_are_config_errors(edit, message):
    loaded = tiny_model("llama")
    with pytest.raises(ConfigError, match=message):
        edit(loaded)
    assert loaded.num_parameters() == tiny_model("llama").num_parameters()  # nothing changed
