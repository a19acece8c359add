"""LoRA fine-tuning on task data (PEFT), merged into the weights; the adapter is kept too.

Small low-rank updates of chosen Linears are trained while the base weights stay frozen, then
merged into the weights for the next step and export.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): W + (α/r)·B·A
with A [r, in] and B [out, r], B starting at zero so training starts from the model itself.
Built on Hugging Face PEFT (the adapter layers, merging, the adapter file format); kompakt
adds the data handling, the loop and the checks.

Data: `data: PATH` — plain text (loss on every token) or chat / instruction jsonl with
`messages` (loss only on the assistant answers, `answer_only: true`); else the run's data.
`kd_weight` > 0 adds the distillation term against the teacher (default the recipe's
original): loss = kd_weight·T²·KL + (1 − kd_weight)·CE, which keeps the model close to what it
could do before while it learns the task (a guard against forgetting).

Targets: `target_modules: all-linear` (every Linear but the output head, the default) or a
list of module names / name suffixes (`[q_proj, v_proj]`; on the command line
`target_modules=q_proj+v_proj`); names that match nothing are
refused with the list of names that exist.

Outputs: the merged model (the step's model) and the adapter on its own in the step
directory's `adapter/` (PEFT format: adapter_config.json + adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(base, dir)` loads onto the step's input model.

When to use it: to specialise a (shrunk) model on a task or a chat style, before quantization
(merging into quantized weights would leave the grid, so a quantized model is refused).

Sample recipe steps::

    - finetune.lora: {data: support_chats.jsonl, r: 16, tokens: 65536}
    - finetune.lora: {data: notes.txt, target_modules: q_proj+v_proj, kd_weight: 0.5, lr: 2.0e-4}
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, is_moe
from kompakt.model.quantized import is_quantized
from kompakt.ops.kd_losses import DIVERGENCES
from kompakt.passes.base import PassContext, PassReport, PassSpec
from kompakt.passes.train_common import TrainingConfig, prepare, run
from kompakt.train.objectives import DistillObjective

logger = logging.getLogger(__name__)

NAME = "finetune.lora"
ADAPTER_DIR = "adapter"


@dataclass
class LoraConfig(TrainingConfig):
    r: int = field(default=16, metadata={"doc": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"doc": "LoRA scaling alpha (update scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"doc": "dropout on the LoRA input"})
    target_modules: list[str] | str = field(default="all-linear", metadata={"doc": "all-linear or module names / suffixes"})
    answer_only: bool = field(default=True, metadata={"doc": "chat jsonl: train on assistant tokens only"})
    kd_weight: float = field(default=0.0, metadata={"doc": "weight of the KD term against the teacher (0 = plain CE)"})
    temperature: float = field(default=2.0, metadata={"doc": "KD temperature (with kd_weight > 0)"})
    divergence: str = field(default="forward", metadata={"doc": "KD divergence: forward | reverse | jsd"})
    lr: float = field(default=2e-4, metadata={"doc": "peak AdamW learning rate (LoRA takes larger ones)"})

    def validate(self) -> None:
        self.validate_training(NAME)
        if self.r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{NAME}: r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1 are required")
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"{NAME}: kd_weight must lie in [0, 1], got {self.kd_weight}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"{NAME}: divergence {self.divergence!r} is unknown; valid: {', '.join(DIVERGENCES)}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            # "q_proj,v_proj" or "q_proj+v_proj" (a YAML list is the plain way, also in --step: [q_proj, v_proj])
            self.target_modules = [t for t in re.split(r"[,;+\s]+", self.target_modules) if t]

    def peft_targets(self) -> list[str] | str:
        return self.target_modules


def linear_names(model: nn.Module) -> list[str]:
    """Short names (last component) of the model's Linear modules, as PEFT targets match them."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, targets: list[str] | str) -> None:
    """Every target name must match a Linear (PEFT's rule: the full name or its dotted suffix)."""
    if targets == "all-linear":
        return
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched or not targets:
        raise ConfigError(
            f"{NAME}: target_modules {unmatched or targets} match no Linear module; "
            f"modules that exist: {', '.join(linear_names(model))} (or all-linear)"
        )


def _wrap(model: nn.Module, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = config.peft_targets()
    check_targets(model, targets)
    if targets == "all-linear" and is_moe(model):  # PEFT's all-linear would wrap the fused expert parameters too,
        # which its ParamWrapper trains only without dropout: the Linears by name (attention, shared expert)
        head = arch_for(model).lm_head.rsplit(".", 1)[-1]
        targets = [name for name in linear_names(model) if name != head]
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, peft_config)


def apply(ctx: PassContext, config: LoraConfig) -> PassReport:
    loaded = ctx.loaded
    if is_quantized(loaded):
        raise ConfigError(f"{NAME}: {loaded.name} is quantized; merging LoRA would leave the grid — "
                          "fine-tune before quantizing (or train the quantized model with quant.qat)")  # fmt: skip
    check_targets(loaded.model, config.peft_targets())
    prepared = prepare(ctx, config, NAME, answer_only=config.answer_only)
    if config.kd_weight > 0 and prepared.teacher.model is loaded.model:
        raise ConfigError(f"{NAME}: the teacher is the model being tuned; give teacher: PATH or kd_weight: 0")
    teacher = prepared.teacher.model if config.kd_weight > 0 else None
    objective = DistillObjective(teacher, alpha=config.kd_weight, temperature=config.temperature,
                                 divergence=config.divergence)  # fmt: skip
    loaded.fingerprint()  # cached before PEFT changes the module tree (part of checkpoint identities)
    peft_model = _wrap(loaded.model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result = run(ctx, config, NAME, peft_model, objective, prepared)
    files: dict[str, Any] = {}
    if ctx.work_dir is not None:
        adapter = ctx.work_dir / ADAPTER_DIR
        peft_model.save_pretrained(str(adapter))
        files[ADAPTER_DIR] = adapter
    loaded.model = peft_model.merge_and_unload()
    loaded.model.eval()
    history = result.history
    summary = (f"LoRA r={config.r} on {config.target_modules if isinstance(config.target_modules, str) else ','.join(config.target_modules)}"
               f" ({trainable / 1e6:.2f} M trained): {result.tokens} tokens, {result.steps} steps, "
               f"{result.tokens_per_s:.0f} tok/s; loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, merged"
               if history else f"LoRA: nothing left to train")  # fmt: skip
    details = {**result.summary(), "trainable_parameters": trainable, "data": prepared.data.source,
               "adapter": ADAPTER_DIR if files else None}  # fmt: skip
    return PassReport(loaded=loaded, summary=summary, details=details, files=files)


PASS = PassSpec(name=NAME, config=LoraConfig, apply=apply, needs_teacher=True, needs_training=True,
                decoder_only="it trains on next-token prediction, which an encoder does not do; heal an "
                "encoder with distill.kd", doc=__doc__ or "")  # fmt: skip
