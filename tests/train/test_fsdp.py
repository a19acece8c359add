"""kompakt.train.fsdp in one gloo process: sharding a model and giving it back plain.

Several processes are tested end to end in test_ddp_cpu (equal to one process, also after a
kill); here the parts that must hold on any number of processes: the model trains while sharded,
and afterwards is its own class again, with ordinary parameters, no FSDP hooks, tied weights
still tied, and the same outputs as an unsharded copy trained the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kompakt.model.tiny import tiny_model
from kompakt.ops.kd_losses import HiddenProjection
from kompakt.train import fsdp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _step(model, extra, ids):
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    loss = out.loss + extra(0, out.hidden_states[-1]).pow(2).mean()
    loss.backward()
    params = [*model.parameters(), *extra.parameters()]
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    return params


def test_sharded_training_gives_back_a_plain_model_equal_to_unsharded_training(gloo):
    model = tiny_model("qwen2").model.train()  # tied embeddings
    reference, extra = copy.deepcopy(model), HiddenProjection(1, 64, 64)
    reference_extra = copy.deepcopy(extra)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    hooks = {name: len(m._forward_pre_hooks) + len(m._forward_hooks) for name, m in model.named_modules()}

    sharded = fsdp.ShardedModel(model, {"projection": extra}, torch.device("cpu"))
    assert isinstance(model.lm_head.weight, DTensor) and isinstance(extra.maps[0].weight, DTensor)
    for net, proj in ((model, extra), (reference, reference_extra)):
        optimizer = torch.optim.AdamW(_step(net, proj, ids), lr=1e-2)
        optimizer.step()
    sharded.restore()

    assert type(model) is type(reference) and type(model.model.layers[0]) is type(reference.model.layers[0])
    assert {name: len(m._forward_pre_hooks) + len(m._forward_hooks) for name, m in model.named_modules()} == hooks
    assert not any(isinstance(p, DTensor) for p in [*model.parameters(), *extra.parameters()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert torch.equal(extra.maps[0].weight, reference_extra.maps[0].weight)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_checkpoint_shards_round_trip(gloo):
    """What a checkpoint stores of a sharded run (full tensors, local optimizer shards as plain
    tensors) loads back into the sharded model and optimizer."""
    model = tiny_model("llama").model.train()
    fsdp.ShardedModel(model, {}, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    stored = fsdp.local_optimizer_state(optimizer.state_dict())
    assert not any(isinstance(v, DTensor) for s in stored["state"].values() for v in s.values())
    weights = {name: fsdp.full_tensor(p).clone() for name, p in model.named_parameters()}
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(stored)
    fsdp.reshard_optimizer_state(fresh)
    for param, state in fresh.state.items():
        assert isinstance(state["exp_avg"], DTensor) and torch.equal(state["exp_avg"].to_local(),
                                                                     optimizer.state[param]["exp_avg"].to_local())  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
    for name, p in model.named_parameters():
        fsdp.load_full(p, weights[name])
        assert torch.equal(p.full_tensor(), weights[name]), name


def test_fsdp_is_asked_for_only_with_several_processes(monkeypatch):
    monkeypatch.setenv(fsdp.ENV, "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not fsdp.requested()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp.requested()
    with fsdp.accelerate_without_fsdp():
        import os

        assert fsdp.ENV not in os.environ
    assert fsdp.requested()
