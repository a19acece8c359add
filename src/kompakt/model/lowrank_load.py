"""Rebuild a factorized model from its directory: kompakt's own modules, safetensors, config.json.

transformers cannot load it alone: config.json describes the dense architecture and the weights
hold `...q_proj.0.weight` / `...q_proj.1.weight` where it expects `...q_proj.weight`. So the
family's own class (from config.json's model_type, never remote code) is subclassed for the
duration of the load: its `__init__` builds the model and then swaps empty LowRankLinear modules
in where the compression state's `lowrank` entries say (kompakt.model.lowrank.build_lowrank). transformers'
`from_pretrained` then fills that skeleton from the safetensors files with all its usual
machinery (checkpoint key renames, tied weights, dtype, compressed-tensors for factors a later
quant step stored packed), and the loader's missing-weights check covers the factors too.
Afterwards the model's class is set back to the family's class (the subclass adds no state), so
nothing downstream sees a difference between a loaded and an in-memory factorized model.
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import ModelFormatError
from kompakt.model.compression import stored_lowrank
from kompakt.model.lowrank import build_lowrank


def factorized_class(config: dict[str, Any], directory: str) -> type | None:
    """The class that loads `directory` (config.json as the dict `config`) with its factorized
    Linears rebuilt, or None when it has none. ModelFormatError when an entry names a module type
    or module this version does not know (raised at load time, one line)."""
    entries = stored_lowrank(config)
    if not entries:
        return None
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    from kompakt.model.arch import is_encoder_family

    auto = AutoModel if is_encoder_family(config) else AutoModelForCausalLM  # an encoder loads headless
    family = _get_model_class(AutoConfig.for_model(**_model_type_only(config)), auto._model_mapping)

    def __init__(self, hf_config, *args, **kwargs) -> None:  # noqa: N807
        family.__init__(self, hf_config, *args, **kwargs)
        try:
            build_lowrank(self, entries)
        except ValueError as exc:
            raise ModelFormatError(f"{directory} cannot be rebuilt: {exc}; upgrade kompakt") from None

    return type(family.__name__, (family,), {"__init__": __init__, "_kompakt_family": family})


def _model_type_only(config: dict[str, Any]) -> dict[str, Any]:
    """Enough of config.json to pick the model class (the mapping is keyed by config class)."""
    return {"model_type": config["model_type"]}


def restore_family(model: Any) -> Any:
    """Set a model loaded through `factorized_class` back to its family's class."""
    family = getattr(type(model), "_kompakt_family", None)
    if family is not None:
        model.__class__ = family
    return model
