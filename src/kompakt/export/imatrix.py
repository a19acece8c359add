"""kompakt's calibration statistics as a llama.cpp importance matrix, and back.

    imatrix = compute_imatrix(loaded, data="wiki.valid.txt")      # 128 x 512 tokens, as BENCH.md
    write_imatrix(imatrix, "model.imatrix.gguf")                  # llama-quantize --imatrix reads it
    importance = read_importance("llama.imatrix.gguf", loaded)    # {module: mean x² per input [in]}

The statistics are llama-imatrix's (see kompakt.calib.input_sums): per decoder Linear, Σ x² per
input channel over every calibration token and the token count; names are llama.cpp's, from the
same gguf-py table the GGUF export names tensors with. Blocks start with the tokenizer's BOS
where it has one, as llama-imatrix replaces each chunk's first token with BOS.

`read_importance` is what other parts use (allocation, weighted rounding): it accepts a file
from llama-imatrix or from kompakt, GGUF or legacy .dat, and refuses in one line a file whose
tensor names or widths are not this model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kompakt.calib.input_sums import collect_input_sums, decoder_linears
from kompakt.errors import ConfigError, DataError, OutputPathError, UnsupportedArchitectureError
from kompakt.export.gguf_arch import family_for, text_config
from kompakt.export.imatrix_file import Entry, Imatrix, read_imatrix, write_imatrix
from kompakt.model.arch import arch_for, decoder_layers, embeddings_tied, get_submodule, linear_modules
from kompakt.model.loaded import LoadedModel

log = logging.getLogger(__name__)

GENERATED_NAME = "self-generated"  # imatrix.datasets entry when the model wrote its own calibration text

__all__ = ["Imatrix", "ImatrixExport", "compute_imatrix", "export_imatrix", "gguf_linear_names", "read_importance", "read_imatrix",
           "tensor_importance", "write_imatrix"]


def gguf_linear_names(model: Any, *, with_output: bool = False) -> dict[str, str]:
    """HF module name -> llama.cpp weight name (`blk.N.attn_q.weight`) for every decoder Linear,
    and the untied output projection (`output.weight`) when `with_output`.

    gguf-py's table is asked with each Linear's path inside its decoder layer under
    `model.layers.N`, so a decoder inside a wrapper (Gemma 3's model.language_model) is named too.
    """
    import gguf

    config = text_config(model)
    family = family_for(config)
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), int(config.num_hidden_layers))
    module_names = {id(module): name for name, module in model.named_modules()}
    spec = arch_for(model)
    canonical: dict[str, str] = {}  # HF module name -> the name gguf-py's table knows
    for index, layer in enumerate(decoder_layers(model)):
        prefix = module_names[id(layer)] + "."
        for linear in linear_modules(layer, spec).values():
            name = module_names[id(linear)]
            canonical[name] = f"model.layers.{index}.{name.removeprefix(prefix)}"
    if with_output and not embeddings_tied(model):
        canonical[spec.lm_head] = "lm_head"
    mapping: dict[str, str] = {}
    for module, known in canonical.items():
        name = table.get_name(known + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UnsupportedArchitectureError(
                f"{module} has no llama.cpp tensor name for {family.arch.lower()}; an imatrix cannot name it"
            )
        mapping[module] = name
    return mapping


def calibration_blocks(loaded: LoadedModel, data: str | Path | None, n_blocks: int, block_len: int,
                       seed: int) -> torch.Tensor:  # fmt: skip
    """[n_blocks, block_len] token ids: BENCH.md's seeded random starts over the data (or over
    text the model generates, capped as compress caps it), each block led by the tokenizer's BOS."""
    from kompakt.data import load_tokens, sample_blocks
    from kompakt.data.loader import MAX_GENERATED_CALIBRATION_TOKENS
    from kompakt.model.tokens import prefix_ids

    if data is None:
        wanted = max(min(n_blocks * block_len, MAX_GENERATED_CALIBRATION_TOKENS), block_len + 1)
        ids = load_tokens(None, loaded, n_tokens=wanted, seed=seed)
    else:
        ids = load_tokens(data, loaded)
    blocks = sample_blocks(ids, n_blocks, block_len, seed=seed).clone()
    prefix = prefix_ids(loaded.tokenizer) if loaded.tokenizer is not None else []
    if prefix:
        blocks[:, : len(prefix)] = torch.tensor(prefix, dtype=blocks.dtype)
    return blocks


def imatrix_from_blocks(loaded: LoadedModel, blocks: torch.Tensor, *, dataset: str, batch_size: int = 8) -> Imatrix:
    """The importance matrix of `loaded` over token `blocks` [n, len] (one chunk per block)."""
    from kompakt.model.progress import stages

    names = gguf_linear_names(loaded.model)
    with stages() as progress:
        task = progress.add_task("importance matrix", total=blocks.shape[0])
        stats = collect_input_sums(
            loaded.model, blocks, batch_size=batch_size, advance=lambda n: progress.advance(task, n)
        )
    entries = {
        names[module]: Entry(s.sq_sum.detach().cpu().numpy().reshape(1, -1), np.array([s.n_samples]))
        for module, s in stats.items()
    }
    return Imatrix(entries, [dataset], chunk_count=int(blocks.shape[0]), chunk_size=int(blocks.shape[1]))


def compute_imatrix(
    loaded: LoadedModel,
    data: str | Path | None = None,
    *,
    n_blocks: int = 128,
    block_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
) -> Imatrix:
    """llama-imatrix's statistics of `loaded` on `data` (None: text the model generates itself)."""
    gguf_linear_names(loaded.model)  # an architecture llama.cpp cannot name fails before any data work
    blocks = calibration_blocks(loaded, data, n_blocks, block_len, seed)
    dataset = GENERATED_NAME if data is None else Path(str(data)).name
    return imatrix_from_blocks(loaded, blocks, dataset=dataset, batch_size=batch_size)


def read_importance(path: str | Path, loaded: LoadedModel | Any) -> dict[str, torch.Tensor]:
    """{HF module name: mean x² per input channel [in]} from a llama.cpp imatrix file for this model.

    Raises DataError when the file is unreadable or belongs to another model (a tensor name
    this model lacks, or a width that differs).
    """
    model = getattr(loaded, "model", loaded)
    imatrix = read_imatrix(path)
    by_gguf = {gguf_name: module for module, gguf_name in gguf_linear_names(model, with_output=True).items()}
    unknown = sorted(set(imatrix.entries) - set(by_gguf))
    if unknown:
        raise DataError(
            f"{path} is the imatrix of another model: it has {len(unknown)} tensors this model lacks "
            f"(e.g. {unknown[0]}); compute one for this model with `kompakt imatrix`"
        )
    importance: dict[str, torch.Tensor] = {}
    for gguf_name, entry in imatrix.entries.items():
        module = by_gguf[gguf_name]
        width = get_submodule(model, module).in_features
        if entry.sums.shape != (1, width):
            raise DataError(
                f"{path} is the imatrix of another model: {gguf_name} has {entry.sums.shape[-1]} inputs "
                f"x {entry.sums.shape[0]}, this model's {module} has {width}; compute one with `kompakt imatrix`"
            )
        importance[module] = torch.from_numpy(entry.importance()[0])
    missing = sorted(set(decoder_linears(model)) - set(importance))
    if missing:
        log.info("%s has no statistics for %d of this model's Linears (e.g. %s)", path, len(missing), missing[0])
    return importance


def existing_imatrix(path: str | Path) -> Path:
    """`path` expanded, or DataError (one line) when there is no such file."""
    if not Path(path).expanduser().is_file():
        raise DataError(f"imatrix file {path} does not exist; write one with `kompakt imatrix MODEL`")
    return Path(path).expanduser()


def tensor_importance(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What `llama-quantize --imatrix FILE` quantizes with, for a GGUF export whose tensors have
    `shapes` (GGUF name -> shape in the file): ({GGUF name: mean x² per input column, [cols] or
    [experts, cols] for an expert stack}, the quantize.imatrix.* keys llama-quantize writes).

    Tensors without an entry (the token embedding: llama-imatrix never sees its input) are
    quantized without one, as llama-quantize does. Raises DataError for a file that is not an
    imatrix or belongs to another model (a name this model lacks, a width that differs).
    """
    imatrix = read_imatrix(existing_imatrix(path))
    unknown = sorted(set(imatrix.entries) - set(shapes))
    if unknown:
        raise DataError(f"{path} is the imatrix of another model: it has {len(unknown)} tensors this model's GGUF "
                        f"lacks (e.g. {unknown[0]}); compute one for this model with `kompakt imatrix`")  # fmt: skip
    importance: dict[str, np.ndarray] = {}
    for name, entry in imatrix.entries.items():
        shape = shapes[name]
        wanted = (1, shape[-1]) if len(shape) == 2 else (shape[0], shape[-1])
        if entry.sums.shape != wanted:
            raise DataError(f"{path} is the imatrix of another model: {name} has {entry.sums.shape[-1]} inputs x "
                            f"{entry.sums.shape[0]}, this model's has {wanted[1]} x {wanted[0]}; compute one with "
                            "`kompakt imatrix`")  # fmt: skip
        values = entry.importance()
        importance[name] = values[0] if len(shape) == 2 else values
    keys = {"quantize.imatrix.file": Path(path).name, "quantize.imatrix.entries_count": len(imatrix.entries),
            "quantize.imatrix.chunks_count": imatrix.chunk_count}  # fmt: skip
    if imatrix.datasets:
        keys["quantize.imatrix.dataset"] = imatrix.datasets[0]
    return importance, keys


@dataclass
class ImatrixExport:
    """What `export_imatrix` wrote: the file, its tensors, the tokens behind it and where they came from."""

    path: Path
    tensors: int
    tokens: int | None  # calibration tokens behind it (None for a legacy .dat source: it keeps chunks only)
    chunks: int
    chunk_size: int
    datasets: list[str]
    converted_from: Path | None = None


def _check_out(out: str | Path, force: bool) -> Path:
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file name ending in .gguf (or .dat)")
    if path.exists() and not force:
        raise OutputPathError(f"{path} exists; pass --force to replace it or choose another name")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path.parent} does not exist; create it or choose another --out")
    return path


def export_imatrix(
    model: LoadedModel | str | Path | None = None,
    *,
    out: str | Path | None = None,
    data: str | Path | None = None,
    n_blocks: int = 128,
    block_len: int = 512,
    seed: int = 0,
    imatrix: str | Path | None = None,
    force: bool = False,
) -> ImatrixExport:
    """Write `model`'s importance matrix for llama-quantize --imatrix (what `kompakt imatrix` calls).

    With `imatrix`, no data is run: that llama.cpp imatrix file (GGUF or .dat) is checked against
    the model and written again in the format `out` names (.dat or GGUF). `out` defaults to
    `<model name>.imatrix.gguf` in the current directory.
    """
    from kompakt.model.load import load

    if min(n_blocks, block_len) < 1:
        raise ConfigError(f"--blocks and --block-len must be positive (got {n_blocks} x {block_len})")
    if out is not None:
        _check_out(out, force)  # before the model loads
    if imatrix is not None and not Path(imatrix).expanduser().is_file():
        raise DataError(f"imatrix file {imatrix} does not exist; give the path of a llama.cpp imatrix file")
    loaded = model if isinstance(model, LoadedModel) else load(model)
    if imatrix is None and block_len > loaded.context_length:
        raise ConfigError(f"--block-len {block_len} exceeds the model's context ({loaded.context_length}); lower it")
    target = _check_out(out if out is not None else Path(f"{Path(str(loaded.name)).name}.imatrix.gguf"), force)
    if imatrix is not None:
        read_importance(imatrix, loaded)  # refuses another model's file
        result = read_imatrix(imatrix)
    else:
        result = compute_imatrix(loaded, data, n_blocks=n_blocks, block_len=block_len, seed=seed)
    write_imatrix(result, target)
    tokens = None if result.legacy else max(int(entry.counts.max()) for entry in result.entries.values())
    return ImatrixExport(target, len(result.entries), tokens, result.chunk_count, result.chunk_size, result.datasets,
                         Path(imatrix) if imatrix is not None else None)  # fmt: skip
