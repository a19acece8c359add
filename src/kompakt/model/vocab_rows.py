"""Keep some vocabulary rows of a model: embedding and output head rows, vocab_size, token ids.

The surgery half of vocabulary trimming (the tokenizer half is kompakt.model.vocab_trim):
`keep_vocab_rows(loaded, old_ids)` gathers the embedding rows and the output head rows (a tied
pair stays one tensor; a sentence encoder has no head), sets `vocab_size`, and renumbers every token id the configs name
(`bos_token_id`, `eos_token_id` (int or list), `pad_token_id`, `image_token_id`, ... in
config.json, its text config and generation_config.json). The tokenizer is not touched here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, get_submodule, text_config
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.surgery import finish, linear, slice_linear, sync_attrs


def _is_token_key(key: str) -> bool:
    return key.endswith(("_token_id", "_token_ids", "_token_index"))


def _configs(model: nn.Module) -> list[Any]:
    """Every config object that may name token ids: the model's, its text config, generation's."""
    out = [model.config]
    text = text_config(model)
    if text is not model.config:
        out.append(text)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        out.append(generation)
    return out


def _ids_in(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def config_token_ids(model: nn.Module) -> set[int]:
    """The ids the configs name (they must survive trimming)."""
    ids: set[int] = set()
    for config in _configs(model):
        for key, value in list(vars(config).items()):
            if _is_token_key(key):
                ids.update(i for i in _ids_in(value) if i >= 0)
    return ids


def _renumber_config_ids(model: nn.Module, new_of: Mapping[int, int]) -> None:
    for config in _configs(model):
        for key, value in list(vars(config).items()):
            if not _is_token_key(key) or not _ids_in(value):
                continue
            if isinstance(value, int):
                setattr(config, key, new_of.get(value, value) if value >= 0 else value)
            else:
                setattr(config, key, type(value)(new_of.get(v, v) if isinstance(v, int) and v >= 0 else v
                                                 for v in value))  # fmt: skip


def check_rows_editable(loaded: LoadedModel) -> None:
    """ConfigError when the embedding or head carry quantization bookkeeping that names their
    rows (a recorded grid or exact GGUF bytes): trim the vocabulary before quantizing them."""
    spec = arch_for(loaded.model)
    names = {spec.embed, spec.lm_head} - {None}
    state = get_state(loaded)
    on_grid = names & set(state.quantization.modules if state.quantization else ())
    on_grid |= names & set(loaded.gguf_blocks)
    if on_grid:
        raise ConfigError(
            f"prune.vocab: {', '.join(sorted(on_grid))} of {loaded.name} is quantized; "
            "run prune.vocab before the quantization step"
        )


def keep_vocab_rows(loaded: LoadedModel, old_ids: torch.Tensor) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep vocabulary rows `old_ids` (sorted, unique; new id = position), in place."""
    model = loaded.model
    spec = arch_for(model)
    config = text_config(model)
    embed = get_submodule(model, spec.embed)
    head = get_submodule(model, spec.lm_head) if spec.lm_head else None  # an encoder has no head
    old, new = int(embed.weight.shape[0]), int(old_ids.numel())
    if int(config.vocab_size) != old:
        raise ConfigError(f"config vocab_size {config.vocab_size} differs from the embedding's {old} rows")
    tied = head is not None and head.weight is embed.weight
    new_of = {int(o): n for n, o in enumerate(old_ids.tolist())}
    before = loaded.num_parameters()
    index = old_ids.to(embed.weight.device)
    embed.weight = nn.Parameter(embed.weight.data.index_select(0, index).contiguous(),
                                requires_grad=embed.weight.requires_grad)  # fmt: skip
    embed.num_embeddings = new
    if getattr(embed, "padding_idx", None) is not None:
        embed.padding_idx = new_of.get(int(embed.padding_idx))
    if tied:
        head.weight = embed.weight
        head.out_features = new
    elif head is not None:
        slice_linear(linear(model, spec.lm_head), rows=old_ids)
    config.vocab_size = new
    sync_attrs(model, "vocab_size", old, new)
    _renumber_config_ids(model, new_of)
    return finish(loaded, before, {"vocab_size": [old, new]})
