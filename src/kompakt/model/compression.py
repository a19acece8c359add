"""What compression passes leave on a model: one typed contract, the only code that knows its keys.

A pass that changes how weights are stored records it here; saving, loading and export read it
here. Nothing else names the config keys:

    state = get_state(loaded)                  # CompressionState (never None)
    update_state(loaded, quantization=Quantization(...))
    clear_quantization(loaded)                 # the weights are no longer on a grid
    check_stored_state(config_json, where)     # kompakt.load: refuse what this version cannot rebuild
    stores_shared(config_json)                 # kompakt.load: rebuild shared layers first

`CompressionState` fields, and where each lives:

- `quantization` (Quantization): the grid quant.rtn / gptq / qat put the weights on, and which
  modules. config.json key `kompakt_quantization` (as written since the first quant pass; the
  minimal {"format", "modules"} form still reads). Read by GGUF export (exact block grids), by
  `kompakt.model.quantized.is_quantized` (no quantizing twice) and by quant.qat (train on it).
- `awq` (AwqScaling): quant.awq rescaled the weights for this grid. Key `kompakt_awq`.
- `per_tensor_types` (module name -> GGUF type, e.g. "q8_0"): mixed precision. Key
  `kompakt_gguf_types`. A quant step with `tensor_types` records the type of every module it
  quantized and the type the export writes the embedding / output head in (a tied pair is one
  entry, keyed by the embedding). Read by the GGUF export (kompakt.export.gguf_tensors: below
  `--tensor-type`, above `--type`). It is a type choice, not a grid claim, so
  `clear_quantization` keeps it.
- `types_source` ({"source": ..., "calibration": ...}): where those types came from ("recipe",
  "allocation: <how measured>") and the calibration they were measured or solved on; the GGUF
  export writes them as metadata. Key `kompakt_gguf_types_source`.
- `shared` (owner Linear's name -> SharedWeights): share.layers made the Linears named in `users`
  read the owner's weight (one nn.Parameter; saved once, under the owner's name) and, when
  `relax_rank` > 0, turned the owner and every user into a RelaxedLinear with its own rank-r delta
  (kompakt.model.relaxed). Key `kompakt_shared`. Read by kompakt.load (kompakt.model.sharing
  rebuilds the ties before the weights are read), by the save (each shared tensor once) and by
  the export (refused, or `merged_dense` first).
- `lowrank` (module name -> LowRank): a Linear replaced by two (kompakt.model.lowrank: lowrank.svd
  writes it). Key `kompakt_lowrank`. `kompakt.load` rebuilds those modules from it
  (kompakt.model.lowrank_load); GGUF and HF export refuse such a model unless asked to merge.
- `adapter` (Adapter): a LoRA adapter runs beside the (untouched) weights, stored as PEFT files in
  the model directory's `adapter.directory` (lowrank.compensate; kompakt.model.lora_adapter).
  Key `kompakt_adapter`. `kompakt.load` attaches it; `kompakt export --format gguf-lora` writes
  it for llama.cpp. The weights alone are the base model (what `--format gguf` exports).

Exact GGUF bytes a grid cannot give back from dense weights (K-quants) are not config data:
they travel as `LoadedModel.gguf_blocks` (kompakt.model.gguf_blocks).

The packed integer codes a quant pass produced are not state: they travel in its
PassReport.packed_layers (kompakt.passes.base), from which the step save writes them as
compressed-tensors (kompakt.model.quantized); loading densifies them, so a reloaded model has
only `quantization` and transformers' own `quantization_config` (read it through
`compressed_tensors_config`).

A key is written only when its field is not empty, so config.json of a model that uses none of
them is unchanged. The keys are set on the model config and, for multimodal configs, on the text
config too (as quant passes always did), so `save_pretrained` writes them to config.json and
`from_pretrained` reads them back as plain dicts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from kompakt.errors import ModelFormatError
from kompakt.model.loaded import LoadedModel
from kompakt.ops.ggml_types import ASYMMETRIC, QUANT_TYPES
from kompakt.ops.quant import QuantGrid

_QUANTIZATION_KEY = "kompakt_quantization"
_AWQ_KEY = "kompakt_awq"
_GGUF_TYPES_KEY = "kompakt_gguf_types"
_TYPES_SOURCE_KEY = "kompakt_gguf_types_source"
_LOWRANK_KEY = "kompakt_lowrank"
_SHARED_KEY = "kompakt_shared"
_ADAPTER_KEY = "kompakt_adapter"
_COMPRESSED_TENSORS_KEY = "quantization_config"  # transformers' own: weights stored compressed
_INT_FORMAT = re.compile(r"int[2-8]")
_GGUF_TYPE_NAMES = ("f32", "f16", "bf16", *QUANT_TYPES)  # what a per-tensor type may be


def nominal_bits(fmt: str) -> int:
    """The bits a GGUF type is named for (q6_k -> 6, iq4_nl -> 4), or an integer grid's (int3 -> 3)."""
    return int(re.search(r"\d+", fmt).group())  # type: ignore[union-attr]


@dataclass
class PackedLayer:
    """One quantized Linear as the quant pass produced it (QuantGrid / GPTQResult convention).

    codes: integers [out, in] (int32, or int8 / int16 where they fit); scale: [out, n_groups] (its dtype is stored: fp32, fp16 or bf16);
    zero: [out, n_groups] integer zero points or None (symmetric); group_size: None = one
    group per row (per-channel).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None
    symmetric: bool

    @classmethod
    def from_grid(cls, weight: torch.Tensor, grid: QuantGrid) -> PackedLayer:
        """RTN-quantize `weight` [out, in] on `grid`."""
        q, scale, zero = grid.quantize(weight.detach().float().cpu())
        group = grid.group_size_for(weight.shape[1])
        group_size = None if group >= weight.shape[1] else group
        return cls(q, scale.to(grid.scale_dtype), zero, grid.bits, group_size, grid.symmetric)

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        g = self.group_size or in_features
        scale = self.scale.float().repeat_interleave(g, dim=1)[:, :in_features]
        q = self.codes.float()
        if self.zero is not None:
            q = q - self.zero.float().repeat_interleave(g, dim=1)[:, :in_features]
        return q * scale


@dataclass(frozen=True)
class Quantization:
    """The grid the weights of `modules` lie on (their fp32 values are exactly on it).

    format: "int2" .. "int8" for integer grids, or a GGUF type (kompakt.ops.ggml_types.QUANT_TYPES:
    "q4_0", "q6_k", ...), the default one when `per_tensor_types` gives some modules another. group_size: input columns per scale (None = per output channel); `group_sizes`
    names the modules that use another one (a group that does not divide their width).
    """

    method: str
    format: str
    bits: int
    group_size: int | None
    symmetric: bool
    modules: tuple[str, ...]
    group_sizes: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def gguf_format(self) -> str | None:
        """The GGUF type these weights are on (None for integer grids)."""
        return self.format if self.format in QUANT_TYPES else None

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "format": self.format, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "modules": list(self.modules),
                "group_sizes": dict(self.group_sizes)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Quantization:
        """Also the minimal form {"format", "modules"} that early exports and tests wrote.

        Raises ValueError naming what is wrong (an unknown format such as "nf4", a non-integer
        bits or group size, modules that are not a list of names).
        """
        fmt = str(data.get("format") or f"int{data.get('bits', 4)}").lower()
        if fmt not in QUANT_TYPES and not _INT_FORMAT.fullmatch(fmt):
            raise ValueError(f"unknown format {fmt!r} (known: int2..int8, {', '.join(QUANT_TYPES)})")
        bits = data.get("bits") or nominal_bits(fmt)
        group_size = data.get("group_size")
        modules, group_sizes = data.get("modules", []), data.get("group_sizes") or {}
        if not isinstance(bits, int) or (group_size is not None and not isinstance(group_size, int)):
            raise ValueError(f"bits {bits!r} and group_size {group_size!r} must be integers")
        if not isinstance(modules, list | tuple) or not isinstance(group_sizes, Mapping):
            raise ValueError("modules must be a list of module names and group_sizes a mapping")
        return cls(method=str(data.get("method", "")), format=fmt, bits=bits, group_size=group_size,
                   symmetric=bool(data.get("symmetric", fmt not in ASYMMETRIC)), modules=tuple(str(m) for m in modules),
                   group_sizes=dict(group_sizes))  # fmt: skip


@dataclass(frozen=True)
class AwqScaling:
    """quant.awq rescaled the weights (and clipped, when `clip`) for the grid labelled `grid`."""

    grid: str
    clip: bool

    def to_json(self) -> dict[str, Any]:
        return {"grid": self.grid, "clip": self.clip}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AwqScaling:
        return cls(grid=str(data.get("grid", "")), clip=bool(data.get("clip", False)))


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in the model directory's `directory`, made by `method` (e.g. "eora")."""

    directory: str
    method: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "method": self.method}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Adapter:
        if not isinstance(data.get("directory"), str) or not data["directory"]:
            raise ValueError("an adapter needs its directory name")
        return cls(directory=str(data["directory"]), method=str(data.get("method", "")))


@dataclass(frozen=True)
class LowRank:
    """A Linear stored as two: `<name>.0` [rank, in] then `<name>.1` [out, rank] (+ the bias).

    module: the class that holds them (kompakt.model.lowrank.MODULE_TYPE); a loader refuses a
    name it does not know rather than guess the layout.
    """

    rank: int
    method: str = ""  # "plain", "asvd", "svd-llm"
    module: str = "LowRankLinear"

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "method": self.method, "module": self.module}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LowRank:
        """Raises ValueError / TypeError / KeyError for an entry without an integer rank."""
        rank = data["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(f"rank {rank!r} is not an integer")
        return cls(rank=rank, method=str(data.get("method", "")), module=str(data.get("module", "LowRankLinear")))


@dataclass(frozen=True)
class SharedWeights:
    """The owner module's weight is also the weight of every module in `users` (one tensor);
    `relax_rank` > 0: the owner and each user add their own rank-r delta (RelaxedLinear)."""

    users: tuple[str, ...]
    relax_rank: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"users": list(self.users), "relax_rank": self.relax_rank}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SharedWeights:
        """Raises ValueError naming what is wrong (users not a list of names, a bad rank)."""
        users, rank = data.get("users", []), data.get("relax_rank", 0)
        if not isinstance(users, list | tuple) or not all(isinstance(u, str) for u in users):
            raise ValueError("users must be a list of module names")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"relax_rank must be an integer >= 0, got {rank!r}")
        return cls(users=tuple(users), relax_rank=rank)


@dataclass(frozen=True)
class CompressionState:
    """Everything a model's storage owes to compression passes; see the module docstring."""

    quantization: Quantization | None = None
    awq: AwqScaling | None = None
    per_tensor_types: Mapping[str, str] = field(default_factory=dict)
    types_source: Mapping[str, str] = field(default_factory=dict)
    adapter: Adapter | None = None
    lowrank: Mapping[str, LowRank] = field(default_factory=dict)
    shared: Mapping[str, SharedWeights] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


def _model(target: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    """A LoadedModel's model, or the model itself (not `.model`: a CausalLM has an inner one)."""
    return target.model if isinstance(target, LoadedModel) else target


def _configs(model: torch.nn.Module) -> list[Any]:
    """The model config and, when it has a separate one, its text config."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: None)()
    return [config] if text is None or text is config else [config, text]


def _mapping(value: Any, parse: Callable[[Any], Any]) -> dict[str, Any]:
    """A persisted {module name: entry} dict, parsed; anything else (absent) is empty."""
    return {str(k): parse(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def get_state(target: LoadedModel | torch.nn.Module) -> CompressionState:
    """The compression state of a model or LoadedModel (empty when no pass left anything)."""
    model = _model(target)
    config = model.config
    quant = getattr(config, _QUANTIZATION_KEY, None)
    awq = getattr(config, _AWQ_KEY, None)
    adapter = getattr(config, _ADAPTER_KEY, None)
    return CompressionState(
        quantization=Quantization.from_json(quant) if isinstance(quant, Mapping) and quant else None,
        awq=AwqScaling.from_json(awq) if isinstance(awq, Mapping) and awq else None,
        per_tensor_types=_mapping(getattr(config, _GGUF_TYPES_KEY, None), lambda v: str(v).lower()),
        types_source=_mapping(getattr(config, _TYPES_SOURCE_KEY, None), str),
        adapter=Adapter.from_json(adapter) if isinstance(adapter, Mapping) and adapter else None,
        lowrank=_mapping(getattr(config, _LOWRANK_KEY, None), LowRank.from_json),
        shared=_mapping(getattr(config, _SHARED_KEY, None), _shared_entry),
    )


def set_state(target: LoadedModel | torch.nn.Module, state: CompressionState) -> None:
    """Replace the model's compression state with `state` (empty fields remove their keys)."""
    model = _model(target)
    persisted = {
        _QUANTIZATION_KEY: state.quantization.to_json() if state.quantization else None,
        _AWQ_KEY: state.awq.to_json() if state.awq else None,
        _GGUF_TYPES_KEY: dict(state.per_tensor_types) or None,
        _TYPES_SOURCE_KEY: dict(state.types_source) or None,
        _ADAPTER_KEY: state.adapter.to_json() if state.adapter else None,
        _LOWRANK_KEY: {k: v.to_json() for k, v in state.lowrank.items()} or None,
        _SHARED_KEY: {k: v.to_json() for k, v in state.shared.items()} or None,
    }
    for config in _configs(model):
        for key, value in persisted.items():
            if value is not None:
                setattr(config, key, value)
            elif key in config.__dict__:
                delattr(config, key)


def update_state(target: LoadedModel | torch.nn.Module, **changes: Any) -> CompressionState:
    """Change some fields of the state (e.g. `quantization=..., awq=...`); returns the new one."""
    state = replace(get_state(target), **changes)
    set_state(target, state)
    return state


def clear_state(target: LoadedModel | torch.nn.Module) -> None:
    """Forget everything compression passes recorded (the weights themselves are not touched)."""
    set_state(target, CompressionState())


def clear_quantization(target: LoadedModel | torch.nn.Module) -> None:
    """The weights leave their grid (e.g. QAT trains them): drop the grid, a compressed-tensors
    `quantization_config` a reloaded step carries and a LoadedModel's exact GGUF bytes
    (`gguf_blocks`). AWQ scaling and the per-tensor types (a choice, not a claim) stay."""
    update_state(target, quantization=None)
    if isinstance(target, LoadedModel):
        target.gguf_blocks.clear()
    for config in _configs(_model(target)):
        if _COMPRESSED_TENSORS_KEY in config.__dict__:
            delattr(config, _COMPRESSED_TENSORS_KEY)


def compressed_tensors_config(target: LoadedModel | torch.nn.Module | Any) -> dict[str, Any] | None:
    """transformers' `quantization_config` as a plain dict: the grid a model reloaded from a packed
    step was stored on (None when its weights were not stored compressed). `target`: a model, a
    LoadedModel, or a model's config (what the exporter holds)."""
    config = _model(target).config if isinstance(target, LoadedModel | torch.nn.Module) else target
    qconfig = getattr(config, _COMPRESSED_TENSORS_KEY, None)
    if not qconfig:
        return None
    return dict(qconfig) if isinstance(qconfig, Mapping) else qconfig.to_dict()


def stores_shared(config: Mapping[str, Any]) -> bool:
    """Whether a config.json (as a dict) records layers that share weights (kompakt.load rebuilds them)."""
    return any(isinstance(s, Mapping) and bool(s.get(_SHARED_KEY)) for s in (config, config.get("text_config")))


def _shared_entry(value: Any) -> SharedWeights:
    if not isinstance(value, Mapping):
        raise ValueError(f"a shared entry is a {type(value).__name__}, not a mapping")
    return SharedWeights.from_json(value)


def check_stored_state(config: Mapping[str, Any], where: str) -> None:
    """Refuse a config.json (as a dict) whose compression state this version cannot honour.

    A malformed grid, type, sharing or factor record would fail or mislead later: ModelFormatError,
    one line; `where` names the model (its directory).
    """
    sections = [config, config.get("text_config")]
    for section in (s for s in sections if isinstance(s, Mapping)):
        types = section.get(_GGUF_TYPES_KEY)
        if types not in (None, {}) and (not isinstance(types, Mapping) or any(
                str(v).lower() not in _GGUF_TYPE_NAMES for v in types.values())):  # fmt: skip
            raise ModelFormatError(f"{where} has a malformed {_GGUF_TYPES_KEY} in config.json (module -> GGUF type "
                                   "expected); upgrade kompakt, or restore config.json as kompakt wrote it")  # fmt: skip
        checks = ((_QUANTIZATION_KEY, Quantization.from_json), (_AWQ_KEY, AwqScaling.from_json),
                  (_SHARED_KEY, lambda v: _mapping(v, _shared_entry)), (_LOWRANK_KEY, _parse_lowrank),
                  (_ADAPTER_KEY, Adapter.from_json))  # fmt: skip
        for key, parse in checks:
            value = section.get(key)
            if value in (None, {}):
                continue
            try:
                if not isinstance(value, Mapping):
                    raise ValueError(f"a {type(value).__name__}, not a mapping")
                parse(value)
            except (ValueError, TypeError, KeyError) as exc:
                raise ModelFormatError(f"{where} has a malformed {key} in config.json ({exc}); "
                                       "upgrade kompakt, or restore config.json as kompakt wrote it") from None


def stored_lowrank(config: Mapping[str, Any]) -> dict[str, LowRank]:
    """The `lowrank` entries of a config.json (as a dict, already checked by check_stored_state)."""
    for section in (config, config.get("text_config")):
        if isinstance(section, Mapping) and section.get(_LOWRANK_KEY):
            return _parse_lowrank(section[_LOWRANK_KEY])
    return {}


def _parse_lowrank(value: Mapping[str, Any]) -> dict[str, LowRank]:
    return {str(name): LowRank.from_json(entry) for name, entry in value.items()}
