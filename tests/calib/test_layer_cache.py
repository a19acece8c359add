"""The driver's layer caches (kompakt.calib.layer_cache) and shared statistics: the attention and
MLP are computed fewer times, and what every pass sees is what a plain forward of the model as
changed would give (changes to an inner Linear are noticed, not assumed away)."""

from __future__ import annotations

import pytest
import torch

from kompakt.calib import collect_stats, capture_layer_inputs, run_sequential
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.tiny import tiny_model

BLOCKS = torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(1))
ROLES_OF = {"llama": ("attn.v", "mlp.up"), "phi3": ("attn.qkv", "mlp.gate_up"), "gemma3_text": ("attn.v", "mlp.up")}

pytestmark = pytest.mark.usefixtures("one_thread")


def _plain_inputs(model) -> dict[tuple[int, str], torch.Tensor]:
    """Every decoder Linear's input rows in a plain forward of BLOCKS (batches of 2), and the
    last layer's output under key (-1, "out")."""
    spec = arch_for(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        for role, module in linear_modules(layer, spec).items():
            hook = (lambda key: lambda m, a: seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1])))((index, role))
            handles.append(module.register_forward_pre_hook(hook))
    last = decoder_layers(model)[-1]
    handles.append(last.register_forward_hook(lambda m, a, out: seen.setdefault((-1, "out"), []).append(out if torch.is_tensor(out) else out[0])))
    with torch.no_grad():
        for batch in BLOCKS.split(2):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {key: torch.cat(values) for key, values in seen.items()}


@pytest.mark.parametrize("family", sorted(ROLES_OF))
def test_changed_weights_are_seen_and_attention_runs_less(family):
    """A process that rounds each group's Linears (and, at o / down, rescales the rows of the
    Linear producing their input, as AWQ does) gets the same statistics and outputs as a plain
    forward of the final model, while the attention's inner Linears run fewer times."""
    model = tiny_model(family, num_hidden_layers=2).model
    producer_of = {"attn.o": ROLES_OF[family][0], "mlp.down": ROLES_OF[family][1]}
    gram: dict[tuple[int, str], torch.Tensor] = {}
    first = linear_modules(decoder_layers(model)[0], arch_for(model))
    first_role = next(iter(first))
    calls = {"n": 0}
    first[first_role].register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))

    def process(index, layer, stats):
        for role, stat in stats.items():
            gram[(index, role)] = stat.hessian()
            stat.module.weight.data = torch.round(stat.module.weight.data * 8) / 8
            if role in producer_of and index == 1:
                producer = linear_modules(layer, arch_for(model))[producer_of[role]]
                producer.weight.data[:4] *= 0.5

    result = run_sequential(model, BLOCKS, process, batch_size=2)
    runs = calls["n"]
    plain = _plain_inputs(model)
    torch.testing.assert_close(torch.cat(result.outputs), plain[(-1, "out")], rtol=1e-5, atol=1e-5)
    for (index, role), hessian in gram.items():
        if index == 1 and role in producer_of:
            continue  # seen before its producer was rescaled afterwards
        x = plain[(index, role)].double()
        torch.testing.assert_close(hessian.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    # layer 0, 3 batches: the q/k/v (qkv) group and the o group run the attention; the gate/up
    # group's first batch runs it once more to check that it returns o_proj's output; the
    # other runs reuse it (without the caches: 5 runs per batch)
    assert runs == 2 * 3 + 1, runs


def test_linears_reading_one_tensor_share_their_statistics():
    model = tiny_model("llama").model
    captured = capture_layer_inputs(model, BLOCKS, batch_size=2)
    layer = decoder_layers(model)[0]
    linears = linear_modules(layer, arch_for(model))
    group = {role: linears[role] for role in ("attn.q", "attn.k", "attn.v")}
    stats = collect_stats(layer, 0, captured, captured.hidden, group)
    assert stats["attn.k"].hessian_acc is stats["attn.q"].hessian_acc is stats["attn.v"].hessian_acc
    assert stats["attn.v"].module is linears["attn.v"] and stats["attn.v"].n_samples == 5 * 48
    alone = collect_stats(layer, 0, captured, captured.hidden, {"attn.v": linears["attn.v"]})
    assert torch.equal(alone["attn.v"].hessian(), stats["attn.v"].hessian())
