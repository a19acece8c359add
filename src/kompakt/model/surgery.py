"""Structural edits of a loaded model that keep config.json consistent.

Every edit works in place on a `LoadedModel`, for every family of the architecture table
(`kompakt.model.arch`), and leaves a model that `save_model` writes and plain
`AutoModelForCausalLM.from_pretrained` reloads with identical logits:

- `drop_layers(loaded, indices)`: remove decoder layers (config lists such as `layer_types`
  follow, attention `layer_idx` is renumbered so the KV cache indexes stay dense).
- `shrink_mlp(loaded, keep)`: keep the given MLP intermediate channels.
- `shrink_heads(loaded, keep_kv_groups)`: keep whole KV groups (a KV head and the query
  heads that share it), so GQA stays valid.
- `shrink_hidden(loaded, keep)`: keep the given residual-stream (embedding) channels.

Each returns `(loaded, changes)` where `changes` is a JSON-ready dict of what changed.
Widths must be equal in every layer so the result stays a standard architecture.
After an edit `loaded.path` is None (the weights no longer match that directory) and the
cached fingerprint is cleared.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, decoder_layers, get_submodule, set_submodule, text_config
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

Keep = torch.Tensor | Sequence[int]


# --------------------------------------------------------------------------- helpers


def as_index(keep: Keep, size: int, what: str) -> torch.Tensor:
    """Sorted unique LongTensor of indices in [0, size); ConfigError when empty or out of range."""
    index = torch.as_tensor(keep, dtype=torch.long).reshape(-1).cpu()
    if index.numel() == 0:
        raise ConfigError(f"cannot remove every {what}; keep at least one")
    bad = index[(index < 0) | (index >= size)]
    if bad.numel():
        raise ConfigError(f"{what} index out of range [0, {size}): {bad[:8].tolist()}")
    unique, counts = torch.unique(index, sorted=True, return_counts=True)
    if unique.numel() != index.numel():
        raise ConfigError(f"duplicate {what} indices {unique[counts > 1][:8].tolist()}; list each one once")
    return unique


def per_layer(keep: Keep | Sequence[Keep], n_layers: int, size: int, what: str) -> list[torch.Tensor]:
    """One index per layer (a single index is used for every layer); equal counts required."""
    if isinstance(keep, torch.Tensor) and keep.dim() == 1 or _is_flat_ints(keep):
        keeps = [keep] * n_layers
    else:
        keeps = list(keep)  # type: ignore[arg-type]
    if len(keeps) != n_layers:
        raise ConfigError(f"got {len(keeps)} {what} index lists for {n_layers} layers; give one per layer")
    indices = [as_index(k, size, what) for k in keeps]
    counts = {int(i.numel()) for i in indices}
    if len(counts) != 1:
        raise ConfigError(f"keep the same number of {what}s in every layer (got counts {sorted(counts)})")
    return indices


def _is_flat_ints(value: Any) -> bool:
    return isinstance(value, Sequence) and all(isinstance(v, int) for v in value)


def linear(root: nn.Module, path: str) -> nn.Linear:
    module = get_submodule(root, path)
    if not isinstance(module, nn.Linear):
        raise ConfigError(
            f"{path} is a {type(module).__name__}, not a Linear; run structural pruning before "
            "passes that replace Linears (factorization, quantization)"
        )
    return module


def require_linears(layers: Iterable[nn.Module], paths: Iterable[str | None]) -> None:
    """Check every edited module is a plain Linear before the first edit (no half-done surgery)."""
    paths = [p for p in paths if p]
    for layer in layers:
        for path in paths:
            linear(layer, path)


def slice_linear(module: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep the given output rows / input columns of a Linear, in place (bias follows rows)."""
    weight = module.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if module.bias is not None:
            bias = module.bias.data.index_select(0, rows.to(weight.device))
            module.bias = nn.Parameter(bias.contiguous(), requires_grad=module.bias.requires_grad)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    module.out_features, module.in_features = weight.shape


def sync_attrs(model: nn.Module, name: str, old: int, new: int) -> None:
    """Update cached int attributes (e.g. `mlp.intermediate_size`) that equal the old width."""
    for module in model.modules():
        value = module.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value == old:
            setattr(module, name, new)


def finish(loaded: LoadedModel, before: int, changes: dict[str, Any]) -> tuple[LoadedModel, dict[str, Any]]:
    """Common bookkeeping: weights no longer match loaded.path; fingerprint must be recomputed."""
    loaded.path = None
    loaded._fingerprint = None
    changes["parameters"] = [before, loaded.num_parameters()]
    logger.info("surgery: %s", changes)
    return loaded, changes


def _check_unshared(loaded: LoadedModel, edit: str) -> None:
    """ConfigError before any change when share.layers tied the layers: these edits rewrite and
    renumber each layer on its own, which would silently break the recorded ties."""
    if get_state(loaded).shared:
        raise ConfigError(f"cannot {edit} of a model whose layers share weights (share.layers); "
                          "prune before share.layers")  # fmt: skip


def config_problem(loaded: LoadedModel, **changes: Any) -> str | None:
    """Why transformers would reject the config after `changes` (None when it accepts it).

    transformers validates configs on save and load; e.g. Llama and Gemma 2/3 require
    hidden_size to be a multiple of num_attention_heads even with an explicit head_dim.
    """
    config = copy.deepcopy(text_config(loaded.model))
    for key, value in changes.items():
        setattr(config, key, value)
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as error:  # noqa: BLE001 (transformers raises several kinds)
        return str(error.__cause__ or error).strip().splitlines()[-1].strip()
    return None


def check_config(loaded: LoadedModel, **changes: Any) -> None:
    """ConfigError (before any weight is touched) when the edited config would be invalid."""
    problem = config_problem(loaded, **changes)
    if problem:
        widths = ", ".join(f"{key}={value}" for key, value in changes.items() if key != "layer_types")
        raise ConfigError(f"{widths} gives a config transformers rejects ({problem}); choose other widths")


def head_dim_of(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


# --------------------------------------------------------------------------- depth


def drop_layers(loaded: LoadedModel, indices: Iterable[int]) -> tuple[LoadedModel, dict[str, Any]]:
    """Remove the decoder layers at `indices` (0-based), in place.

    Per-layer config lists (`layer_types`) keep the remaining layers' entries, and every
    remaining module's `layer_idx` is renumbered so KV-cache slots stay dense.

    Raises:
        ConfigError: an index out of range, or removing every layer.
    """
    _check_unshared(loaded, "drop layers")
    model = loaded.model
    spec = arch_for(model)
    config = text_config(model)
    layers = decoder_layers(model)
    n_old = len(layers)
    drop = {int(i) for i in indices}
    if any(i < 0 or i >= n_old for i in drop):
        raise ConfigError(f"layer index out of range [0, {n_old}): {sorted(drop)}")
    kept = [i for i in range(n_old) if i not in drop]
    if not kept:
        raise ConfigError(f"cannot remove all {n_old} layers; keep at least one")
    new_lists = _kept_layer_lists(config, spec, n_old, kept)
    check_config(loaded, num_hidden_layers=len(kept), **new_lists)
    before = loaded.num_parameters()
    set_submodule(model, spec.layers, nn.ModuleList([layers[i] for i in kept]))
    for new_idx, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if isinstance(module.__dict__.get("layer_idx"), int):
                module.layer_idx = new_idx
    config.num_hidden_layers = len(kept)
    for key, values in new_lists.items():
        setattr(config, key, values)
    changes = {"removed_layers": sorted(drop), "num_hidden_layers": [n_old, len(kept)]}
    return finish(loaded, before, changes)


def _kept_layer_lists(config: Any, spec: Any, n_old: int, kept: list[int]) -> dict[str, list]:
    """Per-layer config lists (e.g. layer_types) restricted to the kept layers."""
    lists = {}
    for key in dict.fromkeys((*spec.layer_config_lists, "layer_types")):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n_old:
            lists[key] = [values[i] for i in kept]
    return lists


# --------------------------------------------------------------------------- width


def shrink_mlp(loaded: LoadedModel, keep: Keep | Sequence[Keep]) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep the given MLP intermediate channels (one index for all layers, or one per layer).

    gate/up (or both halves of a fused gate_up; an encoder's up alone) lose rows, down loses
    columns; `intermediate_size` (the ArchSpec's intermediate_key) becomes the kept count.
    """
    _check_unshared(loaded, "shrink the MLP")
    model = loaded.model
    spec = arch_for(model)
    config = text_config(model)
    layers = decoder_layers(model)
    key = spec.intermediate_key  # intermediate_size; DistilBERT's hidden_dim
    old = int(getattr(config, key))
    keeps = per_layer(keep, len(layers), old, "MLP channel")
    check_config(loaded, **{key: int(keeps[0].numel())})
    require_linears(layers, (spec.gate, spec.up, spec.gate_up, spec.down))
    before = loaded.num_parameters()
    for layer, index in zip(layers, keeps, strict=True):
        if spec.fused_gate_up:
            slice_linear(linear(layer, spec.gate_up), rows=torch.cat([index, index + old]))
        else:
            for path in (spec.gate, spec.up):  # BERT-style MLPs have no gate
                if path is not None:
                    slice_linear(linear(layer, path), rows=index)
        slice_linear(linear(layer, spec.down), cols=index)
    new = int(keeps[0].numel())
    setattr(config, key, new)
    sync_attrs(model, "intermediate_size", old, new)
    return finish(loaded, before, {"intermediate_size": [old, new]})


def shrink_heads(loaded: LoadedModel, keep_kv_groups: Keep | Sequence[Keep]) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep whole KV groups: KV head g and the query heads g*r .. g*r+r-1 that share it.

    (r = num_attention_heads / num_key_value_heads, as in transformers' repeat_kv.)
    q/k/v lose rows (the fused qkv its three parts), o loses columns; the config gets the new
    head counts and an explicit `head_dim`.
    """
    _check_unshared(loaded, "remove heads")
    model = loaded.model
    spec = arch_for(model)
    config = text_config(model)
    layers = decoder_layers(model)
    n_heads, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    head_dim, rep = head_dim_of(config), n_heads // n_kv
    keeps = per_layer(keep_kv_groups, len(layers), n_kv, "KV group")
    new_kv = int(keeps[0].numel())
    check_config(loaded, num_attention_heads=new_kv * rep, num_key_value_heads=new_kv, head_dim=head_dim)
    require_linears(layers, (spec.q, spec.k, spec.v, spec.qkv, spec.o))
    before = loaded.num_parameters()
    for layer, groups in zip(layers, keeps, strict=True):
        kv_rows = _head_rows(groups, head_dim)
        q_rows = _head_rows((groups[:, None] * rep + torch.arange(rep)).reshape(-1), head_dim)
        if spec.fused_qkv:
            q_size, kv_size = n_heads * head_dim, n_kv * head_dim
            rows = torch.cat([q_rows, kv_rows + q_size, kv_rows + q_size + kv_size])
            slice_linear(linear(layer, spec.qkv), rows=rows)
        else:
            slice_linear(linear(layer, spec.q), rows=q_rows)
            slice_linear(linear(layer, spec.k), rows=kv_rows)
            slice_linear(linear(layer, spec.v), rows=kv_rows)
        slice_linear(linear(layer, spec.o), cols=q_rows)
    config.head_dim = head_dim  # explicit, so hidden_size / num_heads is never used to infer it
    config.num_attention_heads = new_kv * rep
    config.num_key_value_heads = new_kv
    for name, old, new in (("num_key_value_heads", n_kv, new_kv), ("num_heads", n_heads, new_kv * rep)):
        sync_attrs(model, name, old, new)
    changes = {"num_attention_heads": [n_heads, new_kv * rep], "num_key_value_heads": [n_kv, new_kv]}
    return finish(loaded, before, changes)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a [heads * head_dim, in] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink_hidden(loaded: LoadedModel, keep: Keep) -> tuple[LoadedModel, dict[str, Any]]:
    """Keep the given hidden (residual-stream) channels everywhere, in place.

    Embedding columns, every residual-stream norm, the input columns of q/k/v/gate/up, the
    output rows of o/down, the final norm, lm_head columns (tied embeddings stay tied) and the
    ArchSpec's `hidden_outputs` (a multimodal projector's output columns).
    RMSNorm now averages over fewer channels, so outputs shift (Minitron accepts this and
    heals with distillation). Families that scale embeddings by sqrt(hidden_size) (Gemma)
    get the kept embedding values preserved: the weights absorb the changed scale and, when
    tied, the final norm absorbs the inverse so the logits keep their scale.
    """
    _check_unshared(loaded, "shrink the hidden size")
    model = loaded.model
    spec = arch_for(model)
    config = text_config(model)
    old = int(config.hidden_size)
    index = as_index(keep, old, "hidden channel")
    new = int(index.numel())
    check_config(loaded, hidden_size=new, head_dim=head_dim_of(config))
    require_linears(decoder_layers(model), spec.linear_paths.values())
    before = loaded.num_parameters()
    embed = get_submodule(model, spec.embed)
    head = get_submodule(model, spec.lm_head)
    tied = head.weight is embed.weight
    if not tied:
        linear(model, spec.lm_head)
    scale = _rescale_embed_scale(embed, old, new) if spec.embed_scale else 1.0
    embed.weight = nn.Parameter(
        (embed.weight.data.index_select(1, index.to(embed.weight.device)) * scale).contiguous(),
        requires_grad=embed.weight.requires_grad,
    )
    embed.embedding_dim = new
    final_norm = get_submodule(model, spec.final_norm)
    _slice_norm(final_norm, index)
    if tied:
        head.weight = embed.weight
        head.in_features = new
        if scale != 1.0:
            _scale_norm(final_norm, 1.0 / scale, spec.norm_offset)
    else:
        slice_linear(linear(model, spec.lm_head), cols=index)
    for path in spec.hidden_outputs:
        _slice_last_dim(model, path, index)
    for layer in decoder_layers(model):
        _shrink_layer_hidden(layer, spec, index)
    config.head_dim = head_dim_of(config)  # explicit before hidden_size changes
    config.hidden_size = new
    sync_attrs(model, "hidden_size", old, new)
    return finish(loaded, before, {"hidden_size": [old, new]})


def _slice_last_dim(model: nn.Module, path: str, index: torch.Tensor) -> None:
    """Keep the `index` entries of the last dimension of the parameter at `path`."""
    owner_path, _, name = path.rpartition(".")
    owner = get_submodule(model, owner_path)
    weight = getattr(owner, name)
    kept = weight.data.index_select(-1, index.to(weight.device)).contiguous()
    setattr(owner, name, nn.Parameter(kept, requires_grad=weight.requires_grad))


def _shrink_layer_hidden(layer: nn.Module, spec: Any, index: torch.Tensor) -> None:
    for role, path in spec.norm_paths.items():
        if role not in ("attn.q_norm", "attn.k_norm"):  # those act on head_dim, not hidden
            _slice_norm(get_submodule(layer, path), index)
    for role, path in spec.linear_paths.items():
        if role in ("attn.o", "mlp.down"):
            slice_linear(linear(layer, path), rows=index)
        else:
            slice_linear(linear(layer, path), cols=index)


def _slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Keep channels of a norm: every 1-D parameter (weight, bias) is indexed."""
    for name, param in list(norm.named_parameters(recurse=False)):
        sliced = param.data.index_select(0, index.to(param.device)).contiguous()
        setattr(norm, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (int(index.numel()),)


def _scale_norm(norm: nn.Module, factor: float, offset: float) -> None:
    """Fold a scale into a norm computing x * (offset + w): w' = (offset + w) * factor - offset."""
    weight = norm.weight.data
    weight.copy_(((offset + weight.float()) * factor - offset).to(weight.dtype))


def _rescale_embed_scale(embed: nn.Module, old: int, new: int) -> float:
    """Set a sqrt(hidden_size) embedding scale for the new width; return old_scale / new_scale.

    The embedding weights are multiplied by the returned factor so the scaled embeddings of
    the kept channels are unchanged.
    """
    buffer = getattr(embed, "embed_scale", None)
    if buffer is None:
        return 1.0
    old_scale, new_scale = float(buffer), new**0.5
    if abs(old_scale - old**0.5) > 1e-3 * old**0.5:
        logger.warning("embedding scale %.4f is not sqrt(hidden_size); keeping it", old_scale)
        return 1.0
    if isinstance(buffer, torch.Tensor):
        buffer.fill_(new_scale)
    else:
        embed.embed_scale = new_scale
    if hasattr(embed, "scalar_embed_scale"):
        embed.scalar_embed_scale = new_scale
    return old_scale / new_scale
