"""`export(model, format=..., type=..., out=...)`: the one function `kompakt export` calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kompakt.errors import ConfigError, OutputPathError
from kompakt.export.check import ExportCheck, check_error, record_check, reject, run_check, verify_path
from kompakt.export.gguf import write_gguf
from kompakt.export.gguf_lora import LORA_TYPES
from kompakt.export.gguf_tensors import TYPES
from kompakt.export.gguf_types import parse_overrides
from kompakt.export.hf import HF_TYPES, export_hf
from kompakt.export.manifest import DIRECTORY_MANIFEST, manifest_path, write_manifest
from kompakt.export.merge import dense_for_export
from kompakt.export.onnx import ONNX_TYPES, require_onnx
from kompakt.export.staging import Stage
from kompakt.model.loaded import LoadedModel
from kompakt.model.lora_adapter import attached, without_adapter

if TYPE_CHECKING:
    from kompakt.export.onnx_check import OnnxCheck

FORMATS = ("gguf", "gguf-lora", "hf", "ollama", "onnx")


@dataclass
class ExportResult:
    path: Path
    manifest: Path
    format: str
    type: str
    size_bytes: int
    notes: list[str] = field(default_factory=list)
    types_summary: str = ""  # gguf: every weight tensor's type in one line
    check: ExportCheck | OnnxCheck | None = None  # the file reloaded in its runtime (None with verify=False)


def default_out(name: str, format: str, type: str) -> Path:
    prefix = {"gguf-lora": "lora-", "onnx": "onnx-"}.get(format, "")
    stem = f"{Path(str(name)).name}-{prefix}{type}"
    return Path.cwd() / (f"{stem}.gguf" if format in ("gguf", "gguf-lora") else stem)


def _check_early(format: str, type: str | None, out: str | Path | None, force: bool, tensor_types: list[str] | None,
                 base: str | Path | None = None, imatrix: str | Path | None = None) -> None:  # fmt: skip
    """What can be refused before loading the model (which can take a while)."""
    types = {"hf": tuple(HF_TYPES), "gguf-lora": LORA_TYPES, "onnx": ONNX_TYPES}.get(format, TYPES)
    if type is not None and type not in types:
        raise ConfigError(f"--format {format} takes --type {', '.join(types)}; got {type!r}")
    if format == "onnx":
        require_onnx()
    if tensor_types and format != "gguf":
        raise ConfigError(f"--tensor-type sets GGUF tensor types; use it with --format gguf, not {format}")
    parse_overrides(tensor_types)
    if imatrix is not None and format != "gguf":
        raise ConfigError(f"--imatrix rounds GGUF tensors; use it with --format gguf, not {format}")
    if imatrix is not None:
        from kompakt.export.imatrix import existing_imatrix

        existing_imatrix(imatrix)
    if base is not None and format != "gguf-lora":
        raise ConfigError(f"--base names the base GGUF of a LoRA adapter; use it with --format gguf-lora, not {format}")
    if base is not None and not Path(base).expanduser().is_file():
        raise ConfigError(f"--base {base} is not a file; give the .gguf the adapter will run on")
    if out is not None and Path(out).expanduser().exists() and not force:
        path = Path(out).expanduser().absolute()
        raise OutputPathError(f"{path} exists; pass --force to replace it or choose another name")


def export(
    model: LoadedModel | str | Path | None = None,
    *,
    format: str = "gguf",
    type: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    verify: bool = True,
    tensor_types: list[str] | None = None,
    merge: bool = False,
    base: str | Path | None = None,
    max_memory: int | str | None = None,
    imatrix: str | Path | None = None,
) -> ExportResult:
    """Export a model (a LoadedModel or anything kompakt.model.load accepts; None = embedded default).

    format "gguf": type one of kompakt.ops.ggml_types.NAMES (f32, f16, bf16, q8_0, q6_k, ...,
    q4_0, q3_k, q2_k; default f16), each tensor's own type from `tensor_types` (`PATTERN=TYPE`,
    as llama-quantize's --tensor-type) and the model's per-tensor types first
    (kompakt.export.gguf_types); out default `<name>-<type>.gguf` in the current directory. format
    "gguf-lora": the model's LoRA adapter (lowrank.compensate) for llama.cpp's --lora, type f16
    (default), f32 or q8_0 (lora_a in q8_0, lora_b in f16), checked against the base GGUF `base`
    when given (kompakt.export.gguf_lora); out default `<name>-lora-<type>.gguf`. format "onnx": a
    sentence encoder as a directory with model.onnx (pooling inside the graph), tokenizer and
    configs, type f32 (default) or int8 (onnxruntime's dynamic quantization), checked in
    onnxruntime (kompakt.export.onnx); out default `<name>-onnx-<type>/`. format "hf": type f32 |
    f16 | bf16 (default the stored dtype), out default `<name>-<type>/`. format "ollama": a directory with
    model.gguf (a given .gguf is copied; a model is exported with type, default q4_0) and a
    Modelfile (template and stop tokens from the chat template).

    The export is written and checked beside its destination and only then put in place
    (kompakt.export.staging), so `force` never replaces a good export with a broken one.
    verify: reload the export in its runtime and compare it with the model it came from
    (kompakt.export.check); a failing export is left as `<name>.rejected` and ExportCheckError
    is raised. The result is in `.check` and in the export's verify.json.
    merge: write a factorized (lowrank.svd) or shared (share.layers) model as its dense
    equivalent; without it such a model is refused (kompakt.export.merge).

    A model given as a path (or name) is written to GGUF one tensor at a time from its
    memory-mapped weights (kompakt.export.gguf_stream: the same bytes, peak memory one tensor);
    the check then loads it whole only when it fits `max_memory` (bytes or "6GB"; default the
    memory available now), and otherwise says how to check the file instead.
    imatrix (gguf): a llama.cpp importance matrix (`kompakt imatrix`, llama-imatrix) the
    quantized tensors are rounded with, as `llama-quantize --imatrix` does (the same bytes).
    """
    format = format.lower()
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    default_type = {"gguf": "f16", "gguf-lora": "f16", "ollama": "q4_0", "onnx": "f32"}.get(format, "")
    type = (type or default_type).lower() or None
    _check_early(format, type, out, force, tensor_types, base, imatrix)
    if format == "ollama":
        return _export_ollama(model, type, out, force, verify, merge)
    if format == "gguf-lora":
        return _export_gguf_lora(_load(model), type or "f16", out, force, base)
    if format == "onnx":
        return _export_onnx(_load(model), type or "f32", out, force, verify, merge)
    budget = memory_budget(max_memory)
    if format == "gguf" and not isinstance(model, LoadedModel):
        from kompakt.export.gguf_stream import open_streamable

        lazy = open_streamable(model)
        if lazy is not None:
            return _export_gguf_streamed(lazy, model, type, out, force, verify, tensor_types, budget, imatrix)
    loaded, merge_notes = dense_for_export(_load(model), format, merge)
    target = Path(out) if out is not None else default_out(loaded.name, format, type or "hf")
    target = _check_destination(format, target, force)
    with Stage(target.parent, target.name) as stage:
        staged = stage.path(target.name)
        if format == "gguf":
            written = write_gguf(loaded, staged, type=type, force=True, tensor_types=tensor_types, imatrix=imatrix)
            result = ExportResult(target, manifest_path(target), "gguf", written.type, written.size_bytes,
                                  merge_notes + written.notes, types_summary=written.types_summary)  # fmt: skip
        else:
            export_hf(loaded, staged, type=type, force=True)
            size = sum(p.stat().st_size for p in staged.glob("*.safetensors"))
            stored = type or str(loaded.storage_dtype).removeprefix("torch.")
            result = ExportResult(target, target / DIRECTORY_MANIFEST, "hf", stored, size, merge_notes)
        if format == "gguf" and attached(loaded.model):
            result.notes.append("the model's LoRA adapter is not in this file: export it with --format gguf-lora "
                                "and run llama.cpp with --lora")  # fmt: skip
        if verify:
            with without_adapter(loaded.model):  # the runtimes load the weights alone
                result.check = _verify(loaded, stage, staged, format, result.type, [staged, manifest_path(staged)])
        if format == "gguf":  # the file first, its manifest last; an older verify.json would describe another file
            verify_file = verify_path(staged, format).name
            shipped = [target.name, *([verify_file] if verify else []), manifest_path(staged).name]
            stage.publish(shipped, stale=(verify_file,))
        else:
            stage.publish([target.name])  # verify.json and SHA256SUMS are inside
    return result


def memory_budget(max_memory: int | str | None) -> tuple[int | None, str]:
    """(bytes, how it was set) of `--max-memory`, or of the memory available now when not given."""
    from kompakt.process_memory import available_memory
    from kompakt.units import parse_memory

    if max_memory is None:
        return available_memory(), "available"
    return parse_memory(max_memory), "--max-memory"


def _export_gguf_streamed(lazy, source, type: str, out: str | Path | None, force: bool, verify: bool,
                          tensor_types: list[str] | None, budget: tuple[int | None, str],
                          imatrix: str | Path | None = None) -> ExportResult:  # fmt: skip
    """A GGUF written tensor by tensor (kompakt.export.gguf_stream), checked and put in place as
    the in-memory export's is; the check's reference is loaded only when it fits `budget`."""
    from kompakt.export.gguf_stream import write_gguf_streamed
    from kompakt.model.compression import get_state

    target = Path(out) if out is not None else default_out(lazy.name, "gguf", type)
    target = _check_destination("gguf", target, force)
    with Stage(target.parent, target.name) as stage:
        staged = stage.path(target.name)
        written = write_gguf_streamed(lazy, staged, type=type, force=True, tensor_types=tensor_types, imatrix=imatrix)
        result = ExportResult(target, manifest_path(target), "gguf", written.type, written.size_bytes,
                              written.notes, types_summary=written.types_summary)  # fmt: skip
        if get_state(lazy.loaded()).adapter is not None:
            result.notes.append("the model's LoRA adapter is not in this file: export it with --format gguf-lora "
                                "and run llama.cpp with --lora")  # fmt: skip
        reference = _check_reference(lazy, source, budget, result) if verify else None
        if reference is not None:
            with without_adapter(reference.model):
                result.check = _verify(reference, stage, staged, "gguf", result.type, [staged, manifest_path(staged)])
        verify_file = verify_path(staged, "gguf").name
        shipped = [target.name, *([verify_file] if result.check is not None else []), manifest_path(staged).name]
        stage.publish(shipped, stale=(verify_file,))
    return result


def _check_reference(lazy, source, budget: tuple[int | None, str], result: ExportResult) -> LoadedModel | None:
    """The original, loaded whole for the check when it fits the budget (with room for llama.cpp's
    copy of the file); otherwise None and a note saying how to check the file."""
    import torch

    from kompakt.units import size

    limit, how = budget
    need = lazy.bytes_in(torch.float32) + result.size_bytes
    if limit is not None and need > limit:
        result.notes.append(f"not checked against the original: the check loads it in fp32 beside the file "
                            f"({size(need)}), more than the {size(limit)} {how}; measure the file with "
                            f"kompakt eval {result.path} --reference <model> instead")  # fmt: skip
        return None
    return _load(source)


def _export_gguf_lora(loaded: LoadedModel, type: str, out: str | Path | None, force: bool,
                      base: str | Path | None) -> ExportResult:  # fmt: skip
    """The adapter file, written atomically once every name and shape fits (the base when given)."""
    from kompakt.export.gguf_lora import write_gguf_lora

    target = Path(out) if out is not None else default_out(loaded.name, "gguf-lora", type)
    written = write_gguf_lora(loaded, target, type=type, base=base, force=force)
    return ExportResult(written.path, written.manifest, "gguf-lora", type, written.size_bytes, written.notes,
                        types_summary=f"{written.tensors} adapted tensors, alpha {written.alpha:g}")  # fmt: skip


def _export_onnx(loaded: LoadedModel, type: str, out: str | Path | None, force: bool, verify: bool,
                 merge: bool) -> ExportResult:  # fmt: skip
    """The ONNX directory, written and checked in onnxruntime beside its destination, then put in
    place with its kompakt-verify.json and SHA256SUMS. Factorized or shared layers export as they
    run (ONNX has no layer types to lose), dense with --merge."""
    import json

    from kompakt.atomic import write_text
    from kompakt.export.check import VERIFY_FILE
    from kompakt.export.onnx import MODEL_FILE, OUTPUTS, as_fp32_cpu, refuse_decoder, write_onnx
    from kompakt.export.onnx_check import check_onnx
    from kompakt.model.progress import spinner

    refuse_decoder(loaded)
    loaded, notes = dense_for_export(loaded, "onnx", True) if merge else (loaded, [])
    loaded = as_fp32_cpu(loaded)
    target = Path(out) if out is not None else default_out(loaded.name, "onnx", type)
    target = _check_destination("onnx", target, force)
    with Stage(target.parent, target.name) as stage:
        staged = stage.path(target.name)
        written = write_onnx(loaded, staged, type=type)
        run = (f"run: onnxruntime.InferenceSession('{target / MODEL_FILE}') with inputs {', '.join(written.inputs)} "
               f"from its tokenizer; output {OUTPUTS[0]} is the finished embedding")  # fmt: skip
        result = ExportResult(target, target / DIRECTORY_MANIFEST, "onnx", type, written.size_bytes,
                              [*notes, *written.notes, run])  # fmt: skip
        if verify:
            with spinner("checking the export in onnxruntime"):
                result.check = check_onnx(loaded, staged, type=type)
            if result.check.failed:
                raise check_error(result.check, reject([staged], into=stage.destination)[0])
            write_text(staged / VERIFY_FILE, json.dumps(result.check.to_dict(), indent=1) + "\n")
        write_manifest(staged)
        stage.publish([target.name])
    return result


def _check_destination(format: str, target: Path, force: bool) -> Path:
    """The absolute path a gguf or hf export goes to, checked before anything is written."""
    from kompakt.export.gguf import check_output

    if format == "gguf":
        return check_output(target, force)
    target = target.expanduser().absolute()
    if target.exists() and not force:
        raise OutputPathError(f"{target} exists; pass --force (force=True) to replace it or choose another name")
    if target.exists() and not target.is_dir():
        kind = "ONNX" if format == "onnx" else "Hugging Face"
        raise OutputPathError(f"{target} is a file; choose a directory path for the {kind} export")
    return target


def _verify(reference: LoadedModel, stage: Stage, staged: Path, format: str, type: str,
            written: list[Path]) -> ExportCheck:  # fmt: skip
    """Check the staged export; record the result in it, or move what was `written` to
    `<name>.rejected` in the destination (manifests dropped: they would vouch for it) and raise,
    the destination's old export untouched."""
    check = run_check(reference, staged, format=format, type=type)
    if check.failed:
        raise check_error(check, reject(written, into=stage.destination)[0])
    record_check(check, staged, format)
    return check


def _load(model: LoadedModel | str | Path | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    from kompakt.model.load import load

    return load(model, device="cpu", dtype="float32")


def _export_ollama(model, type: str, out: str | Path | None, force: bool, verify: bool, merge: bool) -> ExportResult:
    """model.gguf and the Modelfile, staged inside the output directory (which may hold other
    files), checked, and renamed into it with a SHA256SUMS that lists them and their verify.json."""
    from kompakt.export.ollama import GGUF_NAME, MODELFILE, check_out_dir, export_ollama

    is_gguf = isinstance(model, (str, Path)) and str(model).lower().endswith(".gguf")
    source, merge_notes = (model, []) if is_gguf else dense_for_export(_load(model), "ollama", merge)
    name = source.name if isinstance(source, LoadedModel) else Path(str(model)).stem
    out_dir = check_out_dir(Path(out) if out is not None else Path.cwd() / f"{name}-ollama", force)
    with Stage(out_dir, "ollama") as stage:
        export_ollama(source, stage.root, force=True, type=type)
        gguf = stage.path(GGUF_NAME)
        result = ExportResult(out_dir, manifest_path(out_dir), "ollama", type, gguf.stat().st_size,
                              [*merge_notes, f"run: ollama create {name} -f {out_dir / MODELFILE}"])  # fmt: skip
        verify_file = verify_path(stage.root, "ollama").name
        if verify:
            # A copied GGUF is compared with kompakt's own reading of it (the same weights, dequantized).
            reference = _load(model) if is_gguf else source
            written = [gguf, stage.path(MODELFILE), manifest_path(gguf)]
            with without_adapter(reference.model):  # llama.cpp runs the base weights alone
                result.check = _verify(reference, stage, stage.root, "ollama", _gguf_type(gguf, type), written)
        write_manifest(stage.root)  # after verify.json, so the manifest lists it
        names = sorted(path.name for path in stage.root.iterdir() if path.name != DIRECTORY_MANIFEST)
        stage.publish([*names, DIRECTORY_MANIFEST], stale=(verify_file, manifest_path(gguf).name))
    return result


def _gguf_type(path: Path, default: str) -> str:
    """The type of a GGUF file from its general.file_type (a copied file's own type)."""
    import gguf

    from kompakt.export.gguf_types import FILE_TYPES

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return default
    names = {int(gguf.LlamaFileType[name]): type for type, name in FILE_TYPES.items()}
    return names.get(int(field.contents()), default)
