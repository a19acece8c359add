"""Quantized models stored truly small: integer weights packed with their scales (compressed-tensors).

    save_quantized(loaded, "runs/q4/step", {"model.layers.0.mlp.down_proj": PackedLayer(...), ...})

(PackedLayer: kompakt.model.compression; a quant pass's PassReport.packed_layers) writes a
Hugging Face directory in the `compressed-tensors` "pack-quantized" format (the
format vLLM and transformers' CompressedTensorsHfQuantizer read): per quantized Linear
`weight_packed` (int32, bits·in/32 words per row), `weight_scale` [out, groups],
`weight_shape`, and `weight_zero_point` for asymmetric grids; config.json gets the
`quantization_config` describing each group of layers. Everything else is written in
`dense_dtype` (the runner uses 16 bits, kompakt.rundir.stepsave). A 4-bit layer takes 1/8 of
its fp32 bytes (1/4 of fp16) plus the scales (fp16 from the quant passes: 1/32 more at g64).

Reading back: `kompakt.model.load` turns it into a plain dense model (`densify_compressed`:
codes x scale in fp32, exactly the values the quant pass produced, compressed-tensors'
wrappers removed) whose `config.quantization_config` still names the grid. transformers alone
decompresses it too (multiplying in the scale dtype: fp16 scales give fp16-rounded weights).

Codes follow kompakt.ops.quant.QuantGrid: symmetric q in [-2^(b-1), 2^(b-1)-1] and w = q·s;
asymmetric q in [0, 2^b-1] with integer zero z and w = (q - z)·s. compressed-tensors stores
signed codes, so asymmetric codes and zeros are shifted by -2^(b-1) (the value is unchanged).

compressed-tensors' "group" strategy cannot hold a shorter last group: choose group sizes
with `storable_group_size` before quantizing; a layer that arrives with a non-dividing group
is re-quantized at the largest dividing size and named in the returned report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kompakt.atomic import atomic_directory
from kompakt.errors import ConfigError, OutputPathError
from kompakt.model.arch import is_moe
from kompakt.model.compression import PackedLayer, compressed_tensors_config, get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.lora_adapter import save_attached
from kompakt.model.save import save_pretrained_on_every_rank, write_encoder_files
from kompakt.ops.quant import QuantGrid

log = logging.getLogger(__name__)

SCALE_DTYPE = torch.float16  # integer-grid scales: what compressed-tensors stores, so passes fit the stored grid
FORMAT = "pack-quantized"
ASYMMETRIC_FORMAT = "int-quantized"  # see _compressed_tensors


@dataclass
class QuantizedSave:
    path: Path
    size_bytes: int
    layers: int
    regrouped: dict[str, int] = field(default_factory=dict)  # layer -> group size used instead


def is_quantized(model_or_loaded) -> bool:
    """True when the weights are already on a grid: a quant pass recorded one
    (kompakt.model.compression) or they were stored compressed (compressed-tensors)."""
    model = model_or_loaded.model if isinstance(model_or_loaded, LoadedModel) else model_or_loaded
    return compressed_tensors_config(model) is not None or get_state(model).quantization is not None


def ensure_not_quantized(loaded, what: str = "quantize") -> None:
    """The check quant passes call first: refuse to quantize quantized weights again."""
    if is_quantized(loaded):
        raise ConfigError(
            f"{getattr(loaded, 'name', 'the model')} is already quantized; {what} the original "
            "(unquantized) model instead of quantizing twice"
        )


def storable_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size compressed-tensors and GGUF can store for a layer: `group_size` when it
    divides in_features, else the largest power-of-two divisor below it (576 with 128 -> 64),
    else None (per channel)."""
    if group_size is None or group_size <= 0 or group_size >= in_features or in_features % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)
    while g >= 8:
        if in_features % g == 0 and g < group_size:
            return g
        g //= 2
    return None


def storage_grid(in_features: int, bits: int, group_size: int | None, symmetric: bool = True) -> QuantGrid:
    """The integer grid a Linear with `in_features` inputs is quantized on, by quant.rtn / gptq /
    awq / qat and by the sensitivity analysis alike (one rule, so analysis measures what the
    passes store): `group_size` falls back to `storable_group_size` where it does not divide the
    width, and a group spanning the whole row is one scale per row (`grid.group_size` None);
    scales are fitted in SCALE_DTYPE. `group_size` None or 0: per channel."""
    group = storable_group_size(in_features, group_size or None)
    per_channel = group is None or group >= in_features
    return QuantGrid(bits, None if per_channel else group, symmetric, scale_dtype=SCALE_DTYPE)


def _regroup(name: str, layer: PackedLayer, notes: dict[str, int]) -> PackedLayer:
    in_features = layer.codes.shape[1]
    g = layer.group_size
    if g is None or in_features % g == 0:
        return layer
    new = storable_group_size(in_features, g)
    notes[name] = new or in_features
    log.warning("%s: group size %d does not divide %d; stored with group size %s (re-quantized)",
                name, g, in_features, new or "per-channel")
    grid = QuantGrid(layer.bits, new, layer.symmetric, scale_dtype=layer.scale.dtype)
    return PackedLayer.from_grid(layer.dequantize(), grid)


def _scheme(layer: PackedLayer) -> tuple:
    strategy = "group" if layer.group_size else "channel"
    return (layer.bits, layer.group_size, layer.symmetric, strategy)


def _compressed_tensors(name: str, layer: PackedLayer) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (layer.bits - 1)
    codes = layer.codes if layer.symmetric else layer.codes - offset
    tensors = {
        f"{name}.weight_packed": pack_to_int32(codes.to(torch.int8).contiguous(), layer.bits),
        f"{name}.weight_scale": layer.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(tuple(layer.codes.shape), dtype=torch.int64),
    }
    if not layer.symmetric:
        # compressed-tensors 0.20 + transformers 5.24 cannot load packed zero points (the meta
        # model keeps them unpacked), so asymmetric layers use "int-quantized": one int8 per weight.
        return {
            f"{name}.weight": codes.to(torch.int8).contiguous(),
            f"{name}.weight_scale": layer.scale.contiguous(),
            f"{name}.weight_zero_point": (layer.zero - offset).to(torch.int8).contiguous(),
        }
    return tensors


def _quantization_config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    for index, ((bits, group_size, symmetric, strategy), names) in enumerate(sorted(groups.items(), key=str)):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                group_size=group_size if strategy == "group" else None)  # fmt: skip
        fmt = FORMAT if symmetric else ASYMMETRIC_FORMAT
        config_groups[f"group_{index}"] = QuantizationScheme(targets=sorted(names), weights=args, format=fmt)
    formats = {group.format for group in config_groups.values()}
    top_format = formats.pop() if len(formats) == 1 else "mixed-precision"
    config = QuantizationConfig(config_groups=config_groups, format=top_format,
                                quantization_status="compressed", ignore=ignore)  # fmt: skip
    data = config.model_dump(exclude_none=True)
    data["quant_method"] = "compressed-tensors"
    return data


def save_quantized(
    loaded: LoadedModel,
    directory: str | Path,
    packed_layers: Mapping[str, PackedLayer],
    dense_dtype: torch.dtype | None = None,
) -> QuantizedSave:
    """Write `loaded` with `packed_layers` (module name -> PackedLayer) stored packed.

    The other weights are written in `dense_dtype` (default loaded.storage_dtype), except those
    of modules the quant pass quantized without packing (e.g. embeddings on a grid), which keep
    loaded.storage_dtype so their values are not rounded. An existing `directory` is replaced
    atomically (temp dir beside it, then rename), as kompakt.model.save.save_model does.
    """
    model = loaded.model
    modules = dict(model.named_modules())
    unknown = [name for name in packed_layers if not isinstance(modules.get(name), torch.nn.Linear)]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a Linear of {loaded.name}; pass module names from named_modules()")
    result = QuantizedSave(Path(directory).expanduser().absolute(), 0, len(packed_layers))
    state = {}
    cast: dict[int, torch.Tensor] = {}  # one cast per storage, so tied embeddings stay tied (saved once)
    groups: dict[tuple, list[str]] = {}
    dense = dense_dtype or loaded.storage_dtype
    quantization = get_state(model).quantization
    exact = set(quantization.modules if quantization else ()) - set(packed_layers)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in packed_layers and name.endswith(".weight"):
            layer = _regroup(module, packed_layers[module], result.regrouped)
            groups.setdefault(_scheme(layer), []).append(module)
            state.update(_compressed_tensors(module, layer))
        else:
            dtype = (loaded.storage_dtype if module in exact else dense) if tensor.is_floating_point() else tensor.dtype
            key = tensor.data_ptr()
            if key not in cast:
                cast[key] = tensor.detach().to("cpu", dtype)
            state[name] = cast[key]
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in packed_layers]
    qconfig = _quantization_config(groups, linears)
    _write_atomic(loaded, state, qconfig, result.path, dense)
    result.size_bytes = sum(p.stat().st_size for p in result.path.glob("*.safetensors"))
    return result


def _write_atomic(loaded: LoadedModel, state: dict, qconfig: dict, target: Path, dtype: torch.dtype) -> None:
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} is a file; choose a directory path for the saved model")
    expected = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    with atomic_directory(target, replace=True, expected_bytes=expected) as temp:
        # An MoE's packed step keeps the model's own tensor names (fused experts): transformers cannot load
        # a compressed-tensors checkpoint whose experts it wrote back in the original per-expert format.
        save_pretrained_on_every_rank(loaded.model, temp, state, original_format=not is_moe(loaded))
        save_attached(loaded.model, temp)
        config_path = temp / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = qconfig
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        loaded.tokenizer.save_pretrained(temp)
        write_encoder_files(loaded, temp)


_QUANT_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_CT_ATTRS = ("quantization_scheme", "quantization_status", "quantization_enabled")


def is_compressed_config(config: dict) -> bool:
    """True for a config.json (as a dict) whose weights are stored by compressed-tensors."""
    qconfig = config.get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors"


@torch.no_grad()
def densify_compressed(model, qconfig: dict) -> int:
    """Turn a compressed-tensors model as transformers loaded it into a plain dense one.

    Every packed Linear gets a float `weight` = codes x scale computed in fp32 (the exact values
    the quant pass produced: the scales were fitted in fp16, and transformers' own decompression
    would multiply in the scale dtype and round), and loses its quantization parameters, forward
    wrapper and scheme, so later passes (pruning, distillation, QAT) see ordinary nn.Linear
    layers. `model.config.quantization_config` becomes the plain dict from config.json: it says
    which grid the weights are on (and `is_quantized` refuses quantizing them again).
    Load the model in float32 for this (a bf16 scale parameter would round the fp16 scales).
    Returns the number of layers densified.
    """
    _remove_dispatch(model)
    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        weight = _dense_weight(module, scheme.weights)
        for name in _QUANT_PARAMS + ("weight",):
            if name in module._parameters:
                del module._parameters[name]
        module.weight = torch.nn.Parameter(weight)
        module.__dict__.pop("forward", None)  # compressed-tensors' wrapper; back to the class forward
        for attr in _CT_ATTRS:
            module.__dict__.pop(attr, None)
        count += 1
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    model.config.quantization_config = qconfig
    return count


def _remove_dispatch(model) -> None:
    """Undo compressed-tensors' offload wrappers (transformers dispatches every compressed model):
    plain parameter dicts and the modules' own forward again."""
    try:
        from compressed_tensors.offload.dispatch import remove_dispatch
    except ImportError:  # older compressed-tensors: no offload wrappers to remove
        return
    remove_dispatch(model)
    for module in model.modules():
        module.__dict__.pop("_original_forward_func", None)
    hook = model.__dict__.pop("ct_decompress_hook", None)  # would decompress (and re-dispatch) on first forward
    if hook is not None:
        hook.remove()


def _dense_weight(module, args) -> torch.Tensor:
    """fp32 weight [out, in] of one compressed Linear (pack-quantized or int-quantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if hasattr(module, "weight_packed"):
        shape = torch.Size(int(d) for d in module.weight_shape)
        codes = unpack_from_int32(module.weight_packed.data, args.num_bits, shape)
    else:  # int-quantized: one int8 code per weight
        codes = module.weight.data
    zero = getattr(module, "weight_zero_point", None)
    scale = module.weight_scale.data.float()
    group = args.group_size if args.strategy == "group" else None
    # Shifting codes and zeros by the same offset leaves (q - z)·s unchanged: use them as stored.
    layer = PackedLayer(codes.to(torch.int32), scale, None if zero is None else zero.data.to(torch.int32),
                        args.num_bits, group, args.symmetric)  # fmt: skip
    return layer.dequantize()


def decompress_in_place(model) -> bool:
    """Give every Linear of a compressed-tensors model a plain `weight` (values unchanged).

    transformers keeps packed layers compressed until their first forward pass; export and
    analysis read `.weight`, so they call this first. Returns True when something was decompressed.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is None:
        return False
    if not any(hasattr(m, "weight_packed") or (hasattr(m, "weight_scale") and m.weight.dtype == torch.int8)
               for m in model.modules()):  # fmt: skip
        return False
    compressor.decompress_model(model)
    return True


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """state_dict with plain weights only: decompressed, quantization parameters left out."""
    decompress_in_place(model)
    return {name: t for name, t in model.state_dict().items() if name.rsplit(".", 1)[-1] not in _QUANT_PARAMS}


def gguf_grid_of_compressed(config) -> dict[str, str]:
    """Module -> GGUF format for compressed-tensors groups whose grid is a llama.cpp block grid.

    Symmetric int4 / int8 in groups of 32 are q4_0 / q8_0 grids (codes -8..7 / -127..127 times
    one scale per 32 weights); the exporter then recovers the exact blocks from the values
    (fp16 scales are needed for that: QuantGrid(scale_dtype=torch.float16)).
    """
    data = compressed_tensors_config(config)
    if data is None:
        return {}
    result = {}
    for group in (data.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("symmetric") and weights.get("group_size") == 32 and weights.get("type") == "int":
            fmt = {4: "q4_0", 8: "q8_0"}.get(weights.get("num_bits"))
            if fmt:
                result.update({target: fmt for target in group.get("targets", []) if not target.startswith("re:")})
    return result
