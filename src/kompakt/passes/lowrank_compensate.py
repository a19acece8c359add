"""lowrank.compensate: a LoRA adapter that corrects the quantization error (EoRA), no training.

Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation" (arXiv:2410.21271); the same closed form as LQER (Zhang et al. 2024) and QERA
(Zhang et al. 2025). For every quantized decoder Linear, the error between the reference weights
(the model that was quantized) and the quantized ones is approximated at rank r in the
eigenspace of the layer's calibration inputs, so B A removes as much of the *output* error as
rank r can (kompakt.ops.error_compensation). The quantized weights stay untouched on their grid;
the correction is a standard PEFT LoRA adapter (alpha = r, scaling 1) saved with the model in
`lora_adapter/`, which kompakt.load attaches (kompakt.model.lora_adapter), PEFT loads
(`PeftModel.from_pretrained(base, dir)`) and `kompakt export --format gguf-lora` writes for
llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`).

Inputs: the quantized model's own layer inputs, layer by layer on the calibration data
(kompakt.calib.run_sequential, as EoRA's reference does). After quant.awq the quantized Linears
read rescaled inputs and some write rescaled outputs: the reference's layer then runs on the same
hidden states and the reference weights are taken in the quantized coordinates, diag(c) W diag(g),
g the measured per-channel input gain, c each row's scale to the quantized row
(kompakt.ops.error_compensation.quantized_coordinates). Corrections do not feed the later
layers' calibration inputs, so the global allocation can see every layer before choosing.

A quantized .gguf (any tool's, any types: `kompakt compress model.gguf --step
lowrank.compensate:reference=./original`) works too: its weights are the file's dequantized
values, every decoder Linear is a target, and the file counts as rescaled when its decoder
norms differ from the reference's (AWQ folds its scales there). The adapter then goes to
llama.cpp with `kompakt export --format gguf-lora --base model.gguf` beside that same file.

Rank: `rank: 16` on every Linear (`allocation: uniform`), or `allocation: global`: the same
number of adapter parameters as uniform rank r, spent where the discarded eigen-weighted error
relative to the Linear's own output is largest (at most `max_rank` per Linear; some get 0).

Tuning (`tune_tokens: N`, off by default): the closed form fits each Linear's output alone, on
the quantized model's own inputs; what the model as a whole gets wrong adds up across layers.
With tune_tokens the factors B, A (nothing else) are then distilled from the reference's
next-token distributions (KL at temperature 1) on N tokens of `tune_data` / the run's data, the
closed form as the starting point — EoRA's own suggestion (its §5: the EoRA adapter as the
initialisation of fine-tuning), here with the reference as the teacher instead of labels. The
result is the same adapter, same rank and bytes. On SmolLM2 AWQ+GPTQ q4_0 at rank 8 (README)
it takes the KL reduction from a few percent to about 15 % for 32k tokens (2 minutes of training
on 2 CPU cores); on plain GPTQ q4_0 from −37 % to −49 %, the lowest KL of the two.

When to use it: right after quant.gptq / quant.rtn (quant.awq before them works too, but AWQ
takes the low-rank part of the error itself and leaves the adapter little: on SmolLM2 plain
GPTQ with an adapter ends lower than AWQ+GPTQ with one at the same bytes), when a few percent
more bytes buy back a large part of the quantization loss (4 bits and below). The reference is the recipe's original unless the steps before the
quantization changed shapes (pruning): then give `reference:` the model that was quantized.

Sample recipe steps::

    - quant.gptq: {format: q4_0}
    - lowrank.compensate: {rank: 16}

    - lowrank.compensate: {rank: 32, allocation: global, max_rank: 128}

    - lowrank.compensate: {rank: 8, tune_tokens: 32768, tune_data: corpus.txt}
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kompakt.calib import LayerStats, run_sequential
from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.compression import Adapter, get_state, update_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.lora_adapter import ADAPTER_DIR, attach, detach, factors_trainable
from kompakt.model.quantized import is_quantized
from kompakt.ops.error_compensation import Spectrum, allocate_ranks, channel_gains, output_error, whitened_svd
from kompakt.passes.base import PassContext, PassReport, PassSpec, doc
from kompakt.train.data import SequenceBatches
from kompakt.train.loop import LoopConfig, train
from kompakt.train.objectives import DistillObjective

logger = logging.getLogger(__name__)

NAME = "lowrank.compensate"
ALLOCATIONS = ("uniform", "global")
TUNE_SEQ_LEN = 512


@dataclass
class CompensateConfig:
    rank: int = field(default=16, metadata=doc("adapter rank per Linear (global: the average)"))
    allocation: str = field(default="uniform", metadata=doc("uniform | global (budget to the largest errors)"))
    max_rank: int | None = field(default=None, metadata=doc("global: rank cap per Linear (default 4 x rank)"))
    reference: str | None = field(default=None, metadata=doc("the model that was quantized (default: the original)"))
    damp: float = field(default=0.01, metadata=doc("input covariance damping, fraction of its mean diagonal"))
    max_blocks: int | None = field(default=None, metadata=doc("use at most this many calibration blocks"))
    batch_size: int = field(default=8, metadata=doc("calibration blocks per layer call"))
    tune_tokens: int = field(default=0, metadata=doc("then distil the factors alone from the reference on this many tokens (0: closed form only)"))
    tune_data: str | None = field(default=None, metadata=doc("text for tune_tokens (null: the run's data, else text the reference writes)"))
    tune_lr: float = field(default=1e-3, metadata=doc("tune_tokens: peak AdamW learning rate of the factors"))

    def validate(self) -> None:
        if self.rank < 1 or (self.max_rank is not None and self.max_rank < 1):
            raise ConfigError(f"{NAME}: rank and max_rank must be at least 1")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"{NAME}: allocation {self.allocation!r} is unknown; valid: {', '.join(ALLOCATIONS)}")
        if self.damp < 0 or self.batch_size < 1 or (self.max_blocks is not None and self.max_blocks < 1):
            raise ConfigError(f"{NAME}: damp must be >= 0, batch_size and max_blocks at least 1")
        if self.tune_tokens < 0 or self.tune_lr <= 0:
            raise ConfigError(f"{NAME}: tune_tokens must be >= 0 and tune_lr positive")

    def cap(self) -> int:
        """The most components kept per Linear."""
        if self.allocation == "uniform":
            return self.rank
        return self.max_rank or 4 * self.rank


class _Accumulator:
    """Σ x_q x_qᵀ [in, in] and Σ x_o² [in] of one Linear (divided by n at the end)."""

    def __init__(self, width: int) -> None:
        self.covariance = torch.zeros(width, width)
        self.cross = torch.zeros(width)
        self.n = 0

    def add(self, x_q: torch.Tensor, x_o: torch.Tensor | None) -> None:
        q = x_q.reshape(-1, x_q.shape[-1]).float()  # [tokens, in]
        self.covariance.addmm_(q.T, q)
        if x_o is not None:
            self.cross += x_o.reshape(-1, x_o.shape[-1]).float().square().sum(0)
        self.n += q.shape[0]


class _Compensator:
    """The run_sequential callback: the whitened error spectrum of every target Linear.

    `rescaled`: quant.awq changed the inputs the quantized Linears read, so the reference layer
    runs on the same hidden states to measure the per-channel gains (kompakt.ops.error_compensation).
    """

    def __init__(self, model: nn.Module, reference: nn.Module, targets: dict[tuple[int, str], str],
                 config: CompensateConfig, rescaled: bool) -> None:  # fmt: skip
        self.spec = arch_for(model)
        self.reference_layers = decoder_layers(reference)
        self.targets = targets
        self.config = config
        self.rescaled = rescaled
        self.spectra: dict[str, Spectrum] = {}

    def process(self, index: int, layer: nn.Module, stats: LayerStats) -> None:
        roles = [role for role in stats if (index, role) in self.targets]
        if not roles:
            return
        ref_layer = self.reference_layers[index]
        ref_linears = linear_modules(ref_layer, self.spec)
        for role in roles:
            self._check_shape(index, role, stats[role].module, ref_linears[role])
        sums = {role: _Accumulator(stats[role].module.in_features) for role in roles}
        seen: dict[str, torch.Tensor] = {}
        hooks = [ref_linears[role].register_forward_pre_hook(_recorder(seen, role)) for role in roles]
        reference = dataclasses.replace(stats, layer=ref_layer)  # the same call arguments (rotary, masks)
        try:
            for batch, hidden in enumerate(stats.inputs):
                seen.clear()
                if self.rescaled:
                    reference.forward([hidden])
                for role in roles:
                    sums[role].add(stats[role].inputs[batch], seen.get(role))
        finally:
            for hook in hooks:
                hook.remove()
        for role in roles:
            self._spectrum(self.targets[(index, role)], stats[role].module, ref_linears[role], sums[role])

    def _spectrum(self, name: str, module: nn.Linear, ref: nn.Linear, sums: _Accumulator) -> None:
        covariance = sums.covariance / sums.n
        gains = channel_gains(sums.cross / sums.n, covariance.diagonal()) if self.rescaled else None
        quantized = module.weight.detach().float().cpu()
        error, space = output_error(ref.weight.detach().float().cpu(), quantized, covariance, gains, self.config.damp)
        scaled = error + quantized.double()  # W in the quantized coordinates
        energy = float(((scaled @ covariance.double()) * scaled).sum())
        self.spectra[name] = whitened_svd(error, space, self.config.cap(), energy)

    def _check_shape(self, index: int, role: str, module: nn.Linear, ref: nn.Linear) -> None:
        if tuple(module.weight.shape) != tuple(ref.weight.shape):
            raise ConfigError(f"{NAME}: layer {index} {role} is {tuple(module.weight.shape)} here but "
                              f"{tuple(ref.weight.shape)} in the reference; give reference: PATH of the model "
                              "that was quantized")  # fmt: skip


def _recorder(seen: dict[str, torch.Tensor], role: str):
    def hook(module: nn.Module, args: tuple) -> None:
        seen[role] = args[0].detach()

    return hook


def _targets(model: nn.Module, every_linear: bool = False) -> dict[tuple[int, str], str]:
    """(layer index, role) -> module name of every quantized decoder Linear (`every_linear`: all
    of them, for a model read from a GGUF, whose file quantized them)."""
    names = {id(module): name for name, module in model.named_modules()}
    spec = arch_for(model)
    found = {(index, role): names[id(module)] for index, layer in enumerate(decoder_layers(model))
             for role, module in linear_modules(layer, spec).items()}  # fmt: skip
    if every_linear:
        return found
    quantized = set(get_state(model).quantization.modules)  # type: ignore[union-attr]
    return {key: name for key, name in found.items() if name in quantized}


def _loaded_from_gguf(loaded: LoadedModel) -> bool:
    """A model kompakt.load read from a .gguf file (its cached conversion): its weights are the
    file's dequantized values, whatever types the file used; no quantization is recorded."""
    from kompakt.model.gguf_convert import is_converted

    return loaded.path is not None and is_converted(loaded.path)


def _norms_differ(model: nn.Module, reference: nn.Module) -> bool:
    """Whether the file's weights are rescaled (AWQ folds its scales into the norms before the
    Linears): a decoder layer's norm weights differ from the reference's. Norms stay F32 in a
    GGUF, so an unscaled file has the reference's values to float precision."""
    for mine, theirs in zip(decoder_layers(model), decoder_layers(reference), strict=True):
        ours = {name: p for name, p in mine.named_parameters() if p.ndim == 1 and "norm" in name}
        for name, param in theirs.named_parameters():
            if name in ours and not torch.allclose(ours[name].detach().float().cpu(), param.detach().float().cpu(),
                                                   rtol=1e-4, atol=1e-6):  # fmt: skip
                return True
    return False


def _reference(ctx: PassContext, config: CompensateConfig, model: nn.Module) -> LoadedModel:
    loaded = ctx.teacher_model(config.reference)
    reference = loaded.model
    if reference is model:
        raise ConfigError(f"{NAME}: the reference is the quantized model itself; give reference: PATH of the "
                          "model before quantization")  # fmt: skip
    if len(decoder_layers(reference)) != len(decoder_layers(model)):
        raise ConfigError(f"{NAME}: the reference has {len(decoder_layers(reference))} layers, this model "
                          f"{len(decoder_layers(model))}; give reference: PATH of the model that was quantized")  # fmt: skip
    return loaded


def _ranks(spectra: dict[str, Spectrum], config: CompensateConfig) -> dict[str, int]:
    if config.allocation == "uniform":
        return {name: min(config.rank, spec.singular.numel()) for name, spec in spectra.items()}
    budget = sum(config.rank * (spec.u.shape[0] + spec.v_back.shape[1]) for spec in spectra.values())
    return allocate_ranks(spectra, budget, config.cap())


def apply(ctx: PassContext, config: CompensateConfig) -> PassReport:
    start = time.perf_counter()
    loaded = ctx.loaded
    from_gguf = _loaded_from_gguf(loaded)
    if not from_gguf and (not is_quantized(loaded) or get_state(loaded).quantization is None):
        raise ConfigError(f"{NAME}: {loaded.name} is not quantized; put {NAME} right after a quant.gptq / "
                          "quant.rtn step, or run it on a quantized .gguf")  # fmt: skip
    model = loaded.model
    detach(model)  # a second compensation starts from the quantized weights alone
    targets = _targets(model, every_linear=from_gguf)
    if not targets:
        raise ConfigError(f"{NAME}: no decoder Linear of {loaded.name} is quantized; nothing to compensate")
    reference = _reference(ctx, config, model)
    blocks = ctx.calibration()[: config.max_blocks]
    rescaled = _norms_differ(model, reference.model) if from_gguf else get_state(loaded).awq is not None
    compensator = _Compensator(model, reference.model, targets, config, rescaled=rescaled)
    roles = sorted({role for _, role in targets})
    result = run_sequential(model, blocks, compensator.process, roles=roles, collect="inputs", true_sequential=False,
                            batch_size=config.batch_size, description="EoRA")  # fmt: skip
    spectra = compensator.spectra
    if all(spec.total_energy <= 1e-12 * max(spec.reference_energy, 1e-30) for spec in spectra.values()):
        raise ConfigError(f"{NAME}: the reference has the same weights as the quantized model; give "
                          "reference: PATH of the model before quantization")  # fmt: skip
    ranks = _ranks(spectra, config)
    factors = {name: spectra[name].factors(r) for name, r in ranks.items() if r > 0}
    attach(model, factors)
    tuned = _tune(ctx, config, loaded, reference) if config.tune_tokens else None
    update_state(loaded, adapter=Adapter(ADAPTER_DIR, "eora"))
    details = _details(spectra, ranks, config, blocks, time.perf_counter() - start, result.seconds)
    if tuned is not None:
        details["tuned"] = tuned
    summary = (f"EoRA {config.allocation} rank {config.rank} on {len(factors)} Linears: "
               f"+{details['adapter_parameters'] / 1e6:.2f} M parameters ({details['adapter_bytes_f16'] / 1e6:.1f} MB "
               f"f16), calibration output error -{100 * details['error_removed']:.1f} %")  # fmt: skip
    if tuned is not None:
        summary += f"; factors distilled on {tuned['tokens']} tokens (loss {tuned['loss_first']:.4f} -> {tuned['loss_last']:.4f})"
    return PassReport(loaded=loaded, summary=summary, details=details)


def _tune(ctx: PassContext, config: CompensateConfig, loaded: LoadedModel, reference: LoadedModel) -> dict[str, Any]:
    """Distil the attached factors alone (the quantized weights stay on their grid) from the
    reference's next-token distributions, KL at temperature 1: the closed form fits each Linear's
    output on its own, this fits what the whole model says (the error that adds up across
    layers). Sequences of 512 one at a time, AdamW, warm-up then cosine; no checkpoints."""
    loop = LoopConfig(tokens=config.tune_tokens, batch_size=1, seq_len=TUNE_SEQ_LEN, lr=config.tune_lr, warmup=0.1,
                      seed=ctx.seed)  # fmt: skip
    data = ctx.training_data(config.tune_data, loop.total_steps() * loop.tokens_per_step(), generator=reference)
    batches = SequenceBatches(data, seq_len=loop.seq_len, batch_size=loop.batch_size, seed=ctx.seed)
    objective = DistillObjective(teacher=reference.model, alpha=1.0, temperature=1.0)
    with factors_trainable(loaded.model):
        result = train(loaded.model, batches, objective, loop, description=f"{NAME} tune")
    return {**result.summary(), "data": data.source}


def _details(spectra: dict[str, Spectrum], ranks: dict[str, int], config: CompensateConfig,
             blocks: torch.Tensor, seconds: float, calib_seconds: float) -> dict[str, Any]:  # fmt: skip
    params = sum(r * (spectra[n].u.shape[0] + spectra[n].v_back.shape[1]) for n, r in ranks.items())
    before = sum(spec.total_energy for spec in spectra.values())
    after = sum(spec.left_error(ranks[name]) for name, spec in spectra.items())
    used = sorted(ranks.values())
    return {
        "method": "eora", "allocation": config.allocation, "rank": config.rank, "modules": len(ranks),
        "ranks": {"min": used[0], "median": used[len(used) // 2], "max": used[-1]},
        "adapter": ADAPTER_DIR, "adapter_parameters": params, "adapter_bytes_f16": 2 * params,
        "error_removed": 1 - after / before if before > 0 else 0.0,
        "calibration_blocks": list(blocks.shape), "seconds": seconds, "calibration_seconds": calib_seconds,
    }  # fmt: skip


PASS = PassSpec(name=NAME, config=CompensateConfig, apply=apply, needs_calibration=True, needs_teacher=True,
                doc=__doc__ or "")  # fmt: skip
