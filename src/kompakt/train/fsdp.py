"""Fully sharded data parallel training (FSDP2, torch's `fully_shard`) for the training loop.

When several processes train together and FSDP is asked for (`accelerate launch --use_fsdp`, which
sets ACCELERATE_USE_FSDP=true; under torchrun set that variable yourself), every decoder layer,
then the rest of the model, is sharded across the processes: each process keeps 1/N of every
parameter, gradient and AdamW state, and gathers one layer's full weights only while that layer
runs. Gradients are reduce-scattered, so the N processes train exactly the model one process would
train with N-fold gradient accumulation (up to float rounding of the sums; test_ddp_cpu).

After training the model is given back whole and plain — ordinary tensors, its own class, no
hooks — because kompakt's next steps (saving, quantization, evaluation) work on ordinary modules.

Library vs ours: torch's `fully_shard` does the sharding and the collectives. accelerate 1.16 only
shards on GPUs (with `--cpu` it quietly falls back to DDP), so kompakt applies `fully_shard` itself,
the same way on every device, and leaves the Accelerator its other jobs (devices, autocast).
Ours: what is sharded, the gather back into a plain model, and checkpoints of each process's
shards (plain local tensors, so they load with `weights_only=True`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from kompakt.errors import UnsupportedArchitectureError
from kompakt.model.arch import decoder_layers
from kompakt.train.distributed import process_count

ENV = "ACCELERATE_USE_FSDP"


def requested() -> bool:
    """Whether this run trains sharded: several processes and FSDP asked for."""
    return process_count() > 1 and os.environ.get(ENV, "false").lower() in ("1", "true", "yes")


@contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Build the Accelerator as if FSDP were not asked for: kompakt shards the model itself (module
    doc), and on a GPU accelerate would otherwise wrap it a second time."""
    saved = os.environ.pop(ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV] = saved


@dataclass
class _Slot:
    """Where one parameter lives (a tied parameter lives in several modules)."""

    places: list[tuple[nn.Module, str]]
    requires_grad: bool


class ShardedModel:
    """Shards `model` (and the objective's trained extra modules) across the processes in place;
    `restore()` gathers every parameter back and makes the modules plain again."""

    def __init__(self, model: nn.Module, extra: dict[str, nn.Module], device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.roots = [model, *extra.values()]
        self._slots = _parameter_slots(self.roots)
        self._classes = {m: type(m) for root in self.roots for m in root.modules()}
        self._hooks = {m: _hook_keys(m) for m in self._classes}
        self._dicts = {m: set(m.__dict__) for m in self._classes}
        mesh = init_device_mesh(device.type, (process_count(),))
        units = [*_layers(model), *extra.values(), model]
        for unit in units:
            fully_shard(unit, mesh=mesh)
        self.model = model

    def local_fraction(self) -> float:
        """Share of the model's parameter elements this process holds (≈ 1/N)."""
        total = sum(p.numel() for p in self.model.parameters())
        local = sum(_local(p).numel() for p in self.model.parameters())
        return local / max(total, 1)

    def set_gradient_sync(self, enabled: bool) -> None:
        """Off for the micro-batches before the last of an accumulation: reduce once per step."""
        for root in self.roots:
            root.set_requires_gradient_sync(enabled)

    def restore(self) -> None:
        """Gather every parameter in full (a collective: all processes call it) and undo the sharding."""
        gathered = []
        for slot in self._slots:
            module, name = slot.places[0]
            full = full_tensor(module._parameters[name])
            gathered.append(nn.Parameter(full.detach().clone(), requires_grad=slot.requires_grad))
        for module, cls in self._classes.items():
            module.__class__ = cls
            for table, hooks in _hook_tables(module).items():
                for key in [k for k in hooks if k not in self._hooks[module].get(table, ())]:
                    del hooks[key]
            for key in [k for k in module.__dict__ if k not in self._dicts[module]]:
                del module.__dict__[key]
        for slot, param in zip(self._slots, gathered, strict=True):
            for module, name in slot.places:
                module._parameters[name] = param


def autocast_forward(model: nn.Module, accelerator) -> nn.Module:
    """What `accelerator.prepare` does to a model's forward under mixed precision — autocast inside,
    outputs back in fp32 — without the DDP wrapper it would add. The loss then sees the same logits
    as in a one-process run (bf16 logits would round the loss differently)."""
    from functools import wraps
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    if accelerator.mixed_precision == "no":
        return model
    model._original_forward = model.forward  # where accelerate's unwrapping looks for it (and restore() drops it)
    autocast = accelerator.autocast
    forward = model.forward

    @wraps(forward)
    def autocast_forward(self, *args, **kwargs):
        with autocast():
            return forward(*args, **kwargs)

    model.forward = MethodType(convert_outputs_to_fp32(autocast_forward), model)
    return model


def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor (a checkpoint's) into `param`, which may be this process's shard."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(full.detach().to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)  # fmt: skip
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full.to(param.device, param.dtype))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with each sharded tensor replaced by this process's shard."""
    return {**state, "state": {k: {n: _local(v) for n, v in s.items()} for k, s in state["state"].items()}}


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of local shards: make each state tensor a shard of its parameter again."""
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for name, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                state[name] = DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                                 stride=param.stride())  # fmt: skip


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _layers(model: nn.Module) -> list[nn.Module]:
    """The decoder (or encoder) layers, each its own unit: one layer's weights gathered at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # finetune.lora's PeftModel
    try:
        return list(decoder_layers(base))
    except UnsupportedArchitectureError:  # no layer map (a test's toy module): shard it as one unit
        return []


def _parameter_slots(roots: list[nn.Module]) -> list[_Slot]:
    by_id: dict[int, _Slot] = {}
    for root in roots:
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    slot = by_id.setdefault(id(param), _Slot([], param.requires_grad))
                    slot.places.append((module, name))
    return list(by_id.values())


def _hook_tables(module: nn.Module) -> dict[str, dict]:
    """Every hook table of a module (forward, backward, state-dict ...) by attribute name."""
    return {name: value for name, value in vars(module).items() if "hook" in name and isinstance(value, dict)}


def _hook_keys(module: nn.Module) -> dict[str, set]:
    return {name: set(hooks) for name, hooks in _hook_tables(module).items()}
