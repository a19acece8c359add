"""The pass registry: an explicit import list (no directory walk). Add a pass here to ship it."""

from __future__ import annotations

from kompakt.passes.base import register

_PASS_MODULES: tuple[str, ...] = (
    "kompakt.passes.prune_depth",
    "kompakt.passes.prune_width",
    "kompakt.passes.prune_sparse",
    "kompakt.passes.prune_vocab",
    "kompakt.passes.share_layers",
    "kompakt.passes.quant_rtn",
    "kompakt.passes.quant_gptq",
    "kompakt.passes.quant_awq",
    "kompakt.passes.distill_kd",
    "kompakt.passes.quant_qat",
    "kompakt.passes.finetune_lora",
    "kompakt.passes.lowrank_svd",
    "kompakt.passes.lowrank_compensate",
    "kompakt.passes.share_basis",
    "kompakt.passes.moe_prune",
    "kompakt.passes.moe_topk",
    "kompakt.passes.moe_merge",
)


def _register_all() -> None:
    from importlib import import_module

    for module_name in _PASS_MODULES:
        register(import_module(module_name).PASS)


_register_all()
