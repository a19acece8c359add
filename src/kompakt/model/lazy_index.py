"""Where a model directory stores each parameter: the tensor index a lazily opened model reads from.

Built from the safetensors headers alone (sharded or not; the index file is checked against the
shards), then keyed by the model's own parameter names through transformers' checkpoint key
renamings (Gemma 3 stores `language_model.model.*`, the model names it `model.language_model.*`).
A family whose checkpoint needs a real conversion while loading (fused experts) is refused. Tied
parameters share the entry of the stored one. A Linear stored by compressed-tensors (a packed
quant step, kompakt.model.quantized) becomes one entry whose `source` names its codes, scale,
zero point and grid, which kompakt.model.lazy dequantizes on read as kompakt.load does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kompakt.errors import ModelFormatError
from kompakt.model.hf_dir import safetensors_files


class NotLazyError(ModelFormatError):
    """A checkpoint whose tensors transformers converts while loading (e.g. per-expert MoE weights
    fused into 3-D stacks): readable whole, but not tensor by tensor."""


@dataclass(frozen=True)
class PackedSource:
    """The stored parts of one compressed-tensors Linear weight (kompakt.model.quantized): its
    scale, zero point (asymmetric grids) and grid. The TensorEntry holding it points at the
    codes (`weight_packed` int32 words, or int8 `weight` for int-quantized layers)."""

    scale: TensorEntry
    zero: TensorEntry | None
    bits: int
    group_size: int | None
    symmetric: bool
    packed: bool  # int32 words ("pack-quantized"), else one int8 per weight ("int-quantized")


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives: its file, its key there, dtype and shape (from the header).

    A weight stored packed (compressed-tensors) has `source` set, its dense shape as `shape` and
    float32 as `dtype`: it is read back dequantized, exactly as kompakt.load densifies it.
    """

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: PackedSource | None = None

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        if self.source is not None:
            return self.numel * self.source.bits // 8
        return self.numel * self.dtype.itemsize


def read_headers(directory: Path) -> dict[str, TensorEntry]:
    """Stored key -> TensorEntry for every tensor of every shard (headers only)."""
    from safetensors import safe_open

    from kompakt.model.hf_dir import _SAFETENSORS_DTYPES

    entries: dict[str, TensorEntry] = {}
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), (torch.float32, 4))[0]
                entries[key] = TensorEntry(file, key, dtype, tuple(int(d) for d in part.get_shape()))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        listed = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        absent = sorted(set(listed) - set(entries))
        if absent:
            raise ModelFormatError(f"{index} lists {absent[0]} (and {len(absent) - 1} more) that no shard holds; "
                                   "copy or download the model again")  # fmt: skip
    return entries


def map_tensors(model: nn.Module, stored: dict[str, TensorEntry],
                 directory: Path) -> tuple[dict[str, TensorEntry], set[str]]:  # fmt: skip
    """(model parameter name -> stored entry, names stored under another name), through
    transformers' own checkpoint key renamings; tied parameters (the same Parameter under two
    names) share the entry of the stored one."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict(model.state_dict())
    mapped: dict[str, TensorEntry] = {}
    for key, entry in stored.items():
        name, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                          meta_state)  # fmt: skip
        if pattern is not None:
            raise NotLazyError(f"{directory} stores {key} in a form transformers converts while loading "
                               f"({pattern}); this family cannot be opened lazily, load it whole")  # fmt: skip
        mapped[name] = entry
    _packed_weights(model, mapped)
    by_param: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in mapped:
            by_param.setdefault(id(param), name)
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in mapped and id(param) in by_param:
            mapped[name] = mapped[by_param[id(param)]]
            aliases.add(name)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in mapped]
    if missing:
        raise ModelFormatError(f"{directory} lacks {len(missing)} weights (e.g. {missing[0]}) that would be random; "
                               "copy or download the model again")  # fmt: skip
    return mapped, aliases


def _packed_weights(model: nn.Module, mapped: dict[str, TensorEntry]) -> None:
    """Replace the stored parts of compressed-tensors Linears (kompakt.model.quantized's format)
    by one `<module>.weight` entry that dequantizes on read; nothing for a dense checkpoint."""
    qconfig = getattr(model.config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return
    grids: dict[str, dict] = {}
    for group in (qconfig.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            grids[target] = group.get("weights") or {}
    for module, weights in grids.items():
        scale = mapped.pop(f"{module}.weight_scale", None)
        if scale is None:
            continue
        packed = mapped.pop(f"{module}.weight_packed", None)
        codes = packed or mapped[f"{module}.weight"]
        mapped.pop(f"{module}.weight_shape", None)
        group = weights.get("group_size") if weights.get("strategy") == "group" else None
        source = PackedSource(scale, mapped.pop(f"{module}.weight_zero_point", None), int(weights.get("num_bits", 4)),
                              group, bool(weights.get("symmetric", True)), packed is not None)  # fmt: skip
        shape = tuple(model.get_parameter(f"{module}.weight").shape)
        mapped[f"{module}.weight"] = TensorEntry(codes.file, codes.key, torch.float32, shape, source)
