"""A LoRA adapter that runs beside a model's own weights: attached at runtime, saved as PEFT.

`lowrank.compensate` corrects a quantized model with B A per Linear without touching its
weights (they stay on their grid, so GGUF export stays exact). The correction must run in every
forward kompakt does (evaluation, chat, further measurements), survive save -> `kompakt.load`,
and be a standard adapter other tools read. So:

- at runtime each corrected Linear gets a `LoraDelta` child and a forward hook adding
  B (A x) to its output. The module tree, parameter names and `state_dict` are unchanged (the
  factors are non-persistent buffers), so saving, GGUF export and the arch table see the plain
  quantized model; `attach` / `attached` / `detach` are the only ways in and out;
- on disk the factors are a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors,
  `lora_alpha` = r per module so PEFT's scaling is 1) in `<model dir>/lora_adapter/`, which
  `peft.PeftModel.from_pretrained(base, dir)` loads. `kompakt.model.save` writes it with the
  model; `kompakt.load` re-attaches it when the compression state names it
  (kompakt.model.compression, field `adapter`).

The adapter files are written by hand (safetensors + PEFT's own LoraConfig for the JSON) rather
than through `get_peft_model(...).save_pretrained`, which would wrap and unwrap the live model
(and leave its parameters frozen) in the middle of a save. finetune.lora, which trains a real
PeftModel, keeps PEFT's save_pretrained.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from kompakt.errors import ModelFormatError
from kompakt.model.compression import get_state

ADAPTER_DIR = "lora_adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM's modules

# module name -> (B [out, r], A [r, in]): the correction is W x + B (A x)
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class LoraDelta(nn.Module):
    """B (A x) for one Linear; its forward hook adds that to the Linear's output."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("b", b, persistent=False)  # [out, r]
        self.register_buffer("a", a, persistent=False)  # [r, in]

    def add_to(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(self.a.dtype)
        return output + ((x @ self.a.T) @ self.b.T).to(output.dtype)


_CHILD = "lora_delta"


def attach(model: nn.Module, factors: Factors) -> None:
    """Add B (A x) to the output of each named Linear (replacing an adapter already there)."""
    detach(model)
    param = next(model.parameters())
    for name, (b, a) in factors.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(linear.weight.shape):
            raise ModelFormatError(f"the LoRA adapter's {name} does not fit the model ({tuple(b.shape)} x "
                                   f"{tuple(a.shape)}); it belongs to another model — re-run lowrank.compensate")  # fmt: skip
        delta = LoraDelta(b.to(param.device, param.dtype), a.to(param.device, param.dtype))
        linear.add_module(_CHILD, delta)
        linear.register_forward_hook(delta.add_to)


def _deltas(model: nn.Module) -> list[tuple[str, nn.Linear, LoraDelta]]:
    """(module name, Linear, its LoraDelta) of every Linear with an attached correction."""
    found = []
    for name, module in model.named_modules():
        delta = module._modules.get(_CHILD) if isinstance(module, nn.Linear) else None
        if isinstance(delta, LoraDelta):
            found.append((name, module, delta))
    return found


def attached(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (B, A) of the adapter attached to the model (empty when none)."""
    return {name: (delta.b, delta.a) for name, _, delta in _deltas(model)}


def detach(model: nn.Module) -> None:
    """Remove every attached LoraDelta and its hook (the Linears are left as they were)."""
    for _, module, delta in _deltas(model):
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__self__", None) is delta:
                del module._forward_hooks[key]
        del module._modules[_CHILD]


@contextlib.contextmanager
def factors_trainable(model: nn.Module) -> Iterator[None]:
    """Inside the block the attached factors are the model's only trainable parameters (so the
    shared training loop trains, clips and checkpoints them and nothing else); after it they are
    the adapter's buffers again, with what was learned, and the model's own parameters are as
    trainable as before."""
    deltas = [delta for _, _, delta in _deltas(model)]
    if not deltas:
        raise ModelFormatError("no LoRA adapter is attached: nothing to train")
    was_trainable = [p for p in model.parameters() if p.requires_grad]
    for param in was_trainable:
        param.requires_grad_(False)
    for delta in deltas:
        for key in ("a", "b"):
            value = delta._buffers.pop(key)
            delta.register_parameter(key, nn.Parameter(value.detach().clone()))
    try:
        yield
    finally:
        for delta in deltas:
            for key in ("a", "b"):
                value = delta._parameters.pop(key)
                delta.register_buffer(key, value.detach(), persistent=False)
        for param in was_trainable:
            param.requires_grad_(True)


@contextlib.contextmanager
def without_adapter(model: nn.Module) -> Iterator[None]:
    """The base model alone inside the block (what a GGUF or a plain transformers load of its
    weights computes), the adapter attached again after."""
    factors = attached(model)
    detach(model)
    try:
        yield
    finally:
        if factors:
            attach(model, factors)


def write_adapter(factors: Factors, directory: Path, base_model: str = "") -> None:
    """Write `factors` as a PEFT LoRA adapter into `directory` (created; the caller makes the
    whole write atomic, e.g. inside kompakt.atomic.atomic_directory)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {name: int(a.shape[0]) for name, (_, a) in factors.items()}
    top = max(ranks.values())
    pattern = {name: r for name, r in ranks.items() if r != top}
    config = LoraConfig(r=top, lora_alpha=top, rank_pattern=pattern, alpha_pattern=dict(pattern),
                        target_modules=sorted(factors), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model or None)  # fmt: skip
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (B, A) of a PEFT LoRA adapter, PEFT's scaling (alpha / r) folded into B.

    Raises ModelFormatError (one line) when the directory is missing, unreadable or not a plain
    LoRA adapter (DoRA, rsLoRA and biases change the forward and are not supported here).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFormatError(f"cannot read the LoRA adapter in {directory} ({type(exc).__name__}); "
                               "restore it, or re-run lowrank.compensate") from None  # fmt: skip
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora") or \
            config.get("bias", "none") != "none":  # fmt: skip
        raise ModelFormatError(f"{directory} is not a plain LoRA adapter (peft_type LORA, no DoRA / rsLoRA / "
                               "bias); kompakt attaches only those")  # fmt: skip
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(f"{_PREFIX}{name}.lora_B.weight")
        if b is None or b.shape[1] != a.shape[0]:
            raise ModelFormatError(f"{directory}: {name} has no matching lora_B; restore the adapter")
        r = int(a.shape[0])
        alpha = float(config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", r)))
        factors[name] = (b.float() * (alpha / r), a.float())
    if not factors:
        raise ModelFormatError(f"{directory} holds no LoRA weights; restore it, or re-run lowrank.compensate")
    return factors


def save_attached(model: nn.Module, directory: Path) -> None:
    """Write the attached adapter into a model directory being saved (where its state says)."""
    factors = attached(model)
    recorded = get_state(model).adapter
    if factors and recorded is not None:
        write_adapter(factors, directory / recorded.directory, base_model=str(directory.name))


def load_attached(model: nn.Module, directory: Path) -> None:
    """Attach the adapter a loaded model's state names (nothing when it names none)."""
    recorded = get_state(model).adapter
    if recorded is not None:
        attach(model, read_adapter(directory / recorded.directory))
