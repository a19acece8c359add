"""Write a model as a GGUF file that llama.cpp (and Ollama, LM Studio) run.

    export_gguf(loaded, "small.gguf", type="q4_0")
    export_gguf(loaded, "mixed.gguf", type="q4_0", tensor_types=["ffn_down=q8_0", "token_embd=q4_0"])

Everything that could make the export fail is checked before a byte is written: the family
(kompakt.export.gguf_arch), every tensor's llama.cpp name and shape (gguf_tensors), the
tokenizer (gguf_tokenizer), the output path. The file is written under a temporary name in
the target directory and renamed when complete; `<file>.sha256` is written beside it.

Each tensor's type: `tensor_types` (`--tensor-type PATTERN=TYPE`), then the model's per-tensor
types, then `type`, with llama.cpp's rules (kompakt.export.gguf_types). general.file_type is the
llama.cpp MOSTLY_* of the type holding most weights; `kompakt.tensor_types` lists every weight
tensor's type in one line, `kompakt.tensor_types.source` says where they came from ("recipe",
"allocation: ...", "--tensor-type", "--type"), and `kompakt.calibration` what the quant step
solved on, when it recorded it.

Quantized-grid contract (for quant passes that choose values on a llama.cpp block grid): the
model's compression state (kompakt.model.compression) has a `quantization` (and, when types
are mixed, `per_tensor_types`) whose modules (names as in model.named_modules()) hold the exact
dequantized values (fp32; bf16/fp16 would round them); it survives save -> reload. A weight
written in the type its grid is recorded in gets its block parameters recovered exactly from
its values (gguf_grid_recover) instead of llama.cpp's re-rounding, or, for grids that cannot be
recovered (K-quants), the exact bytes the pass handed over (LoadedModel.gguf_blocks); a block
that is not on the grid is re-quantized and counted in the log.

Sentence encoders (BERT, DistilBERT, RoBERTa, XLM-R with a WordPiece, BPE or Unigram tokenizer; ModernBERT)
are written as llama.cpp "bert" / "modern-bert" embedding models with their pooling
(kompakt.export.gguf_encoder).

A compressed-tensors directory (kompakt.model.quantized.save_quantized) whose groups are
symmetric int4 / int8 with group_size 32 and fp16 scales is the same q4_0 / q8_0 grid and is
exported exactly the same way, with no extra metadata.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kompakt.errors import ConfigError, OutputPathError, UnsupportedArchitectureError
from kompakt.export.gguf_arch import add_hyperparameters, check_expressible, family_for, text_config
from kompakt.export.gguf_moe import expand_experts
from kompakt.export.gguf_tensors import TYPES, GGUFPlan, TensorPlan, plan_tensors, tensor_data
from kompakt.export.gguf_types import FILE_TYPES, parse_overrides
from kompakt.export.gguf_tokenizer import add_tokenizer, build_vocab
from kompakt.export.manifest import manifest_path, write_manifest
from kompakt.export.public import display_name, public_model_name
from kompakt.atomic import atomic_file, check_room
from kompakt.model.compression import get_state
from kompakt.model.loaded import LoadedModel
from kompakt.model.quantized import dense_state_dict, gguf_grid_of_compressed
from kompakt.model.sharing import refuse_shared

log = logging.getLogger(__name__)
# Room asked for beyond the tensor data: the header (vocabulary, merges, metadata) of the largest
# tokenizers is a few MB (a 256k-token vocabulary with merges: ~10 MB).
HEADER_ALLOWANCE = 16 * 1024 * 1024


@dataclass
class GGUFExport:
    path: Path
    manifest: Path
    type: str
    size_bytes: int
    tensor_types: dict[str, int]  # type -> number of tensors
    types_summary: str = ""  # every weight tensor's type in one line (gguf_types.summarize)
    types_source: dict[str, str] = field(default_factory=dict)  # {"source", "calibration"} as in the metadata
    exact_grid_tensors: int = 0  # tensors written from their on-grid values without re-rounding
    requantized_blocks: int = 0  # blocks of on-grid tensors that were not on the grid
    notes: list[str] = field(default_factory=list)


def grid_modules(model) -> dict[str, str]:
    """Module name -> GGUF grid format: the recorded quantization (each module in its own type
    when the state has per-tensor types; see module docstring), and compressed-tensors groups
    stored on a q4_0 / q8_0 grid (kompakt.model.quantized)."""
    modules = gguf_grid_of_compressed(model.config)
    state = get_state(model)
    if state.quantization is not None:
        fmt = state.quantization.format
        modules.update({name: state.per_tensor_types.get(name, fmt) for name in state.quantization.modules})
    return modules


def check_output(path: Path, force: bool) -> Path:
    """The absolute GGUF path to write, its directory created; refused when it is a directory or
    exists without `force`."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file name ending in .gguf")
    if path.exists() and not force:
        raise OutputPathError(f"{path} exists; pass --force (force=True) to replace it or choose another name")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputPathError(f"cannot create {path.parent} ({error.strerror}); choose a writable path") from None
    return path


def prepare_gguf(loaded: LoadedModel, type: str = "f16", tensor_types: list[str] | None = None,
                 imatrix: str | Path | None = None):  # fmt: skip
    """All checks and decisions of an export, without writing: (family, config, vocab, plan).

    `tensor_types`: `PATTERN=TYPE` overrides (kompakt.export.gguf_types); `imatrix`: a llama.cpp
    importance matrix file the quantized tensors are rounded with (kompakt.export.imatrix).
    """
    type = str(type).lower()
    if type not in TYPES:
        raise ConfigError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    overrides = parse_overrides(tensor_types)
    config = text_config(loaded.model)
    family = family_for(config)
    if family.encoder or _pooling(loaded) is not None:
        _check_encoder(loaded, config, family)
    vocab = build_vocab(loaded.tokenizer, int(config.vocab_size))
    check_expressible(config, family, len(vocab.tokens))
    plan = plan_tensors(loaded.model, config, family, type, grid_modules(loaded.model), overrides,
                        loaded.gguf_blocks)  # fmt: skip
    if imatrix is not None:
        _attach_importance(plan, imatrix)
    plan.notes[:0] = vocab.notes
    return family, config, vocab, plan


def _attach_importance(plan: GGUFPlan, imatrix: str | Path) -> None:
    """Each planned tensor's entry of the imatrix file, and the keys llama-quantize writes for it."""
    from kompakt.export.imatrix import tensor_importance

    importance, plan.imatrix = tensor_importance(imatrix, {item.gguf_name: item.shape for item in plan.tensors})
    for item in plan.tensors:
        item.importance = importance.get(item.gguf_name)
    from kompakt.ops.ggml_types import FLOAT_TYPES

    quantized = [item for item in plan.tensors if item.type not in FLOAT_TYPES and len(item.shape) > 1]
    without = [item.gguf_name for item in quantized if item.importance is None]
    if without:
        plan.notes.append(f"{len(without)} of {len(quantized)} quantized tensors have no entry in {Path(imatrix).name} "
                          f"(e.g. {without[0]}) and were rounded without one, as llama-quantize does")  # fmt: skip


def _pooling(loaded: LoadedModel):
    return getattr(loaded, "pooling", None)


def _check_encoder(loaded: LoadedModel, config, family) -> None:
    from kompakt.export.gguf_encoder import check_encoder

    if not family.encoder:
        raise UnsupportedArchitectureError(
            f"{family.model_type} loaded as a sentence encoder: llama.cpp's {family.arch.lower()} GGUF runs it as "
            "a causal LM; export it with --format hf instead"
        )
    check_encoder(config, family, _pooling(loaded))


def export_gguf(loaded: LoadedModel, path: str | Path, *, type: str = "f16", force: bool = False,
                tensor_types: list[str] | None = None, imatrix: str | Path | None = None) -> Path:  # fmt: skip
    """Write `loaded` as a GGUF file of `type` at `path` (+ `path.sha256`); returns the path.

    `write_gguf` does the same and returns the details (sizes, tensor types, notes).
    """
    return write_gguf(loaded, path, type=type, force=force, tensor_types=tensor_types, imatrix=imatrix).path


def write_gguf(loaded: LoadedModel, path: str | Path, *, type: str = "f16", force: bool = False,
               tensor_types: list[str] | None = None, imatrix: str | Path | None = None) -> GGUFExport:  # fmt: skip
    """Write `loaded` as a GGUF file of `type` at `path` (+ `path.sha256`).

    `tensor_types`: `PATTERN=TYPE` overrides (`--tensor-type`, kompakt.export.gguf_types).
    `imatrix`: a llama.cpp importance matrix (`kompakt imatrix` or llama-imatrix): tensors are
    quantized with it, the bytes `llama-quantize --imatrix` writes.

    Raises:
        UnsupportedArchitectureError: a family or structure llama.cpp cannot run as is.
        OutputPathError: `path` exists (without force) or cannot be written.
        ConfigError: an unknown type, a malformed override or one that matches nothing, a type a
            row cannot take (all before anything is written).
    """
    return write_gguf_with(_write, loaded, path, type=type, force=force, tensor_types=tensor_types, imatrix=imatrix)


Writer = Callable[..., None]  # (tmp path, loaded, family, config, vocab, plan, result): writes the file


def write_gguf_with(write: Writer, loaded: LoadedModel, path: str | Path, *, type: str = "f16", force: bool = False,
                    tensor_types: list[str] | None = None, imatrix: str | Path | None = None) -> GGUFExport:  # fmt: skip
    """`write_gguf` with another way of writing the tensors (kompakt.export.gguf_stream reads
    them one at a time from disk): every check, the free-space check, the atomic rename and the
    manifest are the same."""
    refuse_shared(loaded, "GGUF")  # kompakt.export.api.export(merge=True) writes the dense equivalent
    target = check_output(Path(path), force)
    family, config, vocab, plan = prepare_gguf(loaded, type, tensor_types, imatrix)
    for note in plan.notes:  # returned to the caller too (the CLI prints them)
        log.info("%s", note)
    result = GGUFExport(target, manifest_path(target), str(type).lower(), 0, {}, plan.types_summary(),
                        dict(plan.source), notes=list(plan.notes))  # fmt: skip
    check_room(target, plan.data_bytes() + HEADER_ALLOWANCE)
    with atomic_file(target, expected_bytes=plan.data_bytes()) as tmp:
        write(tmp, loaded, family, config, vocab, plan, result)
    result.size_bytes = target.stat().st_size
    result.manifest = write_manifest(target)
    if result.requantized_blocks:
        note = (
            f"{result.requantized_blocks} blocks of on-grid tensors were not on their grid "
            "and were re-quantized"
        )
        log.info("%s", note)
        result.notes.append(note)
    log.info("wrote %s (%.1f MB, %s)", target, result.size_bytes / 1e6, type)
    return result


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kompakt")
    except PackageNotFoundError:
        return "unknown"


def add_header(writer, loaded: LoadedModel, plan: GGUFPlan, config, family, vocab) -> None:
    """The key-value header every kompakt GGUF has: general keys, where the tensor types came
    from, hyperparameters, tokenizer (auto.gguf_bytes writes the same to size a planned file exactly).

    Each tensor's type is in its tensor info (what llama.cpp and gguf-py list); the header adds
    only where the types came from, so its size does not depend on which types were chosen."""
    import gguf

    file_type = plan.file_type()
    writer.add_type(gguf.GGUFType.MODEL)
    source = public_model_name(loaded)  # a hub id or a name: never a local path (shared file)
    writer.add_name(display_name(source))
    writer.add_quantized_by("kompakt")
    writer.add_string("kompakt.version", _version())
    writer.add_string("kompakt.source", source)
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[file_type]]))
    if any(t not in ("f32", "f16", "bf16") for t in plan.weights_by_type()):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in plan.source.items():  # "source" -> kompakt.tensor_types.source; "calibration"
        writer.add_string("kompakt.tensor_types.source" if key == "source" else f"kompakt.{key}", value)
    for key, value in plan.imatrix.items():  # what llama-quantize --imatrix records
        (writer.add_string if isinstance(value, str) else writer.add_int32)(key, value)
    if family.encoder:
        from kompakt.export.gguf_encoder import add_encoder_hyperparameters

        add_encoder_hyperparameters(writer, config, family, _pooling(loaded))
    else:
        add_hyperparameters(writer, config, family)
    add_tokenizer(writer, vocab)


def _write(tmp: Path, loaded: LoadedModel, family, config, vocab, plan: GGUFPlan, result: GGUFExport) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
    add_header(writer, loaded, plan, config, family, vocab)
    state = expand_experts(dense_state_dict(loaded.model))  # MoE stacks in llama.cpp's layout
    for item, data, raw_type in converted_tensors(plan, state.__getitem__, config, family, result):
        writer.add_tensor(item.gguf_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converted_tensors(plan: GGUFPlan, read: Callable[[str], Any], config, family,
                      result: GGUFExport) -> Iterator[tuple[TensorPlan, Any, Any]]:  # fmt: skip
    """(plan item, file array, raw ggml type) of every planned tensor in file order, each read by
    `read(hf_name)` only when its turn comes (the streaming export reads it from disk then), with
    the counts and notes of `result` updated."""
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("writing GGUF tensors", total=len(plan.tensors))
        for item in plan.tensors:
            data, raw_type, missed = tensor_data(item, read(item.hf_name), config, family)
            result.tensor_types[item.type] = result.tensor_types.get(item.type, 0) + 1
            if item.blocks is not None and missed:
                result.notes.append(f"{item.gguf_name}: its saved {item.type} bytes no longer match the weights "
                                    "(a later step changed them); re-quantized")  # fmt: skip
            elif item.grid == item.type or item.blocks is not None:
                result.exact_grid_tensors += 1
                result.requantized_blocks += missed
            yield item, data, raw_type
            progress.advance(task)
