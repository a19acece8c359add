"""A model's LoRA adapter as a llama.cpp LoRA GGUF: `llama-cli -m base.gguf --lora adapter.gguf`.

    kompakt export runs/x/steps/03-lowrank.compensate --format gguf-lora --out adapter.gguf
    kompakt export runs/x/steps/03-lowrank.compensate --format gguf --type q4_0 --out base.gguf

The file is what llama.cpp's convert_lora_to_gguf.py writes: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight `<name>.lora_a` [r, in] and
`<name>.lora_b` [out, r] (numpy order; llama.cpp's ne is reversed), in f16 (default), f32 or
q8_0, where `<name>` is the GGUF name kompakt's own GGUF export gives the base tensor
(kompakt.export.gguf_tensors), so the adapter fits the base kompakt exported from the same
model. Rows that the base export permutes (llama's q / k: rotate-half -> interleaved) are
permuted in lora_b too: P (W + B A) = P W + (P B) A.

`q8_0` stores each lora_a in llama.cpp's 8-bit blocks of 32 (its rows run along the input, a
multiple of 32 in every model llama.cpp runs) and each lora_b in f16, as convert_lora_to_gguf.py
does with `--outtype q8_0`: lora_b's rows are r long, shorter than a block. That takes about a
quarter off the adapter's bytes (a and b are about equal halves), at q8_0's rounding of A.

llama.cpp scales each pair by alpha / r (r read from the tensor). Ranks may differ per tensor
(global allocation), so alpha is the largest rank and each lora_b is pre-multiplied by
r / alpha: every pair then applies at exactly scale 1, as the adapter runs in kompakt.

`base`: a base GGUF to check the adapter against before writing (its architecture, every
tensor's name and shape); a mismatch is a one-line ConfigError and nothing is written. Without
it the names and shapes are checked against the model's own export plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kompakt.atomic import atomic_file
from kompakt.errors import ConfigError, ModelFormatError, UnsupportedArchitectureError
from kompakt.export.gguf import check_output
from kompakt.export.gguf_arch import family_for, text_config
from kompakt.export.gguf_tensors import TensorPlan, plan_tensors
from kompakt.export.manifest import write_manifest
from kompakt.model.loaded import LoadedModel
from kompakt.model.lora_adapter import attached
from kompakt.ops.ggml_types import ggml_type, gguf_enum, quantize

log = logging.getLogger(__name__)

LORA_TYPES = ("f16", "f32", "q8_0")


@dataclass
class LoraTensor:
    gguf_name: str  # the base tensor's GGUF name, e.g. blk.0.attn_q.weight
    a: np.ndarray  # [r, in], float32
    b: np.ndarray  # [out, r], float32, scaled for llama.cpp's alpha / r


@dataclass
class GGUFLoraExport:
    path: Path
    manifest: Path
    type: str
    size_bytes: int
    tensors: int  # adapted base tensors (two GGUF tensors each)
    alpha: float
    notes: list[str]


def lora_tensors(loaded: LoadedModel) -> tuple[str, float, list[LoraTensor]]:
    """(llama.cpp architecture name, alpha, tensors) of the model's attached adapter."""
    import gguf

    factors = attached(loaded.model)
    if not factors:
        raise ConfigError(f"{loaded.name} carries no LoRA adapter; export the output of a lowrank.compensate step")
    config = text_config(loaded.model)
    family = family_for(config)
    plan = {item.hf_name: item for item in plan_tensors(loaded.model, config, family, "f32", {}).tensors}
    alpha = float(max(int(a.shape[0]) for _, a in factors.values()))
    tensors = []
    for name, (b, a) in sorted(factors.items()):
        item = plan.get(f"{name}.weight")
        if item is None:
            raise UnsupportedArchitectureError(f"the adapter's {name} has no tensor in this model's GGUF export; "
                                               "llama.cpp cannot apply it")  # fmt: skip
        b = b.detach().to("cpu", torch.float32) * (a.shape[0] / alpha)
        b = _permuted(b, item, config)
        tensors.append(LoraTensor(item.gguf_name, a.detach().to("cpu", torch.float32).numpy(), b.numpy()))
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)], alpha, tensors


def _permuted(b: torch.Tensor, item: TensorPlan, config) -> torch.Tensor:
    """lora_b's rows in the order the base export writes the weight's rows."""
    if item.transform not in ("permute_q", "permute_k"):
        return b
    heads = config.num_attention_heads if item.transform == "permute_q" else config.num_key_value_heads
    return b.reshape(heads, 2, b.shape[0] // heads // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)


def stored_type(array: np.ndarray, type: str) -> str:
    """The GGML type one adapter tensor is written in: `type` where a row holds whole blocks
    (q8_0's lora_a), f16 otherwise (lora_b, whose rows are r long)."""
    return type if ggml_type(type).fits(array.shape[-1]) else "f16"


def encoded(array: np.ndarray, type: str):
    """(data, GGML type) of one adapter tensor as the file stores it."""
    name = stored_type(array, type)
    return quantize(array, name), gguf_enum(name)


def check_base(base: str | Path, arch: str, tensors: list[LoraTensor]) -> None:
    """Refuse (ConfigError, one line) a base GGUF the adapter does not fit."""
    import gguf

    path = Path(base).expanduser()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read the base GGUF {path} ({type(exc).__name__}); give the .gguf the "
                               "adapter will run on") from None  # fmt: skip
    field = reader.get_field("general.architecture")
    found = field.contents() if field is not None else None
    if found != arch:
        raise ConfigError(f"--base {path.name} is a {found} model, the adapter is for {arch}; export the base "
                          "from the same model")  # fmt: skip
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # ne -> [out, in]
    for t in tensors:
        want = (t.b.shape[0], t.a.shape[1])
        have = shapes.get(t.gguf_name)
        if have != want:
            what = "has no tensor" if have is None else f"has {t.gguf_name} as {have}, not"
            raise ConfigError(f"--base {path.name} {what} {t.gguf_name if have is None else want}; the adapter "
                              "belongs to another model — export the base from the same step")  # fmt: skip


def write_gguf_lora(loaded: LoadedModel, path: str | Path, *, type: str = "f16", base: str | Path | None = None,
                    force: bool = False) -> GGUFLoraExport:  # fmt: skip
    """Write the model's attached LoRA adapter as a llama.cpp LoRA GGUF at `path` (+ `.sha256`)."""
    import gguf

    type = str(type).lower()
    if type not in LORA_TYPES:
        raise ConfigError(f"--format gguf-lora takes --type {' or '.join(LORA_TYPES)}; got {type!r}")
    target = check_output(Path(path), force)
    arch, alpha, tensors = lora_tensors(loaded)
    if base is not None:
        check_base(base, arch, tensors)
    data = [(f"{t.gguf_name}.{part}", *encoded(array, type)) for t in tensors for part, array in
            (("lora_a", t.a), ("lora_b", t.b))]  # fmt: skip
    size = sum(array.nbytes for _, array, _ in data)
    with atomic_file(target, expected_bytes=size) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{loaded.name} LoRA")
        writer.add_quantized_by("kompakt")
        for name, array, raw_type in data:
            writer.add_tensor(name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    notes = [] if base is not None else ["run it on the base exported from the same model (--format gguf)"]
    log.info("wrote %s (%d adapted tensors, %s)", target, len(tensors), type)
    return GGUFLoraExport(target, write_manifest(target), type, target.stat().st_size, len(tensors), alpha, notes)
