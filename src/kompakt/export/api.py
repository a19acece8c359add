"""`export(model, format=..., type=..., out=...)`: the one function `kompakt export` calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kompakt.errors import ConfigError, OutputPathError
from kompakt.export.check import ExportCheck, check_export
from kompakt.export.gguf import write_gguf
from kompakt.export.gguf_tensors import TYPES
from kompakt.export.hf import HF_TYPES, export_hf
from kompakt.export.manifest import manifest_path, write_manifest
from kompakt.model.loaded import LoadedModel

FORMATS = ("gguf", "hf", "ollama")


@dataclass
class ExportResult:
    path: Path
    manifest: Path
    format: str
    type: str
    size_bytes: int
    notes: list[str] = field(default_factory=list)
    check: ExportCheck | None = None  # the file reloaded in its runtime (None with verify=False)


def default_out(name: str, format: str, type: str) -> Path:
    stem = f"{Path(str(name)).name}-{type}"
    return Path.cwd() / (f"{stem}.gguf" if format == "gguf" else stem)


def _check_early(format: str, type: str | None, out: str | Path | None, force: bool) -> None:
    """What can be refused before loading the model (which can take a while)."""
    types = tuple(HF_TYPES) if format == "hf" else TYPES
    if type is not None and type not in types:
        raise ConfigError(f"--format {format} takes --type {', '.join(types)}; got {type!r}")
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
) -> ExportResult:
    """Export a model (a LoadedModel or anything kompakt.model.load accepts; None = embedded default).

    format "gguf": type f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 (default f16), out default
    `<name>-<type>.gguf` in the current directory. format "hf": type f32 | f16 | bf16 (default
    the stored dtype), out default `<name>-<type>/`. format "ollama": a directory with
    model.gguf (a given .gguf is copied; a model is exported with type, default q4_0) and a
    Modelfile (template and stop tokens from the chat template).

    verify: reload the export in its runtime and compare it with the model it came from
    (kompakt.export.check); a failing export is renamed `<name>.rejected` and ExportCheckError
    is raised. The result is in `.check` and in `<file>.verify.json`.
    """
    format = format.lower()
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    default_type = {"gguf": "f16", "ollama": "q4_0"}.get(format, "")
    type = (type or default_type).lower() or None
    _check_early(format, type, out, force)
    if format == "ollama":
        return _export_ollama(model, type, out, force, verify)
    loaded = _load(model)
    target = Path(out) if out is not None else default_out(loaded.name, format, type or "hf")
    if format == "gguf":
        written = write_gguf(loaded, target, type=type, force=force)
        result = ExportResult(written.path, written.manifest, "gguf", written.type, written.size_bytes, written.notes)
    else:
        path = export_hf(loaded, target, type=type, force=force)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        stored = type or str(loaded.storage_dtype).removeprefix("torch.")
        result = ExportResult(path, manifest_path(path), "hf", stored, size)
    if verify:
        written_paths = [result.path, result.manifest] if format == "gguf" else [result.path]
        result.check = check_export(loaded, result.path, format=format, type=result.type, written=written_paths)
    return result


def _load(model: LoadedModel | str | Path | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    from kompakt.model.load import load

    return load(model, device="cpu", dtype="float32")


def _export_ollama(model, type: str, out: str | Path | None, force: bool, verify: bool) -> ExportResult:
    from kompakt.export.ollama import GGUF_NAME, MODELFILE, export_ollama

    is_gguf = isinstance(model, (str, Path)) and str(model).lower().endswith(".gguf")
    source = model if is_gguf else _load(model)
    name = source.name if isinstance(source, LoadedModel) else Path(str(model)).stem
    target = Path(out) if out is not None else Path.cwd() / f"{name}-ollama"
    modelfile = export_ollama(source, target, force=force, type=type)
    manifest = write_manifest(modelfile.parent)
    gguf = modelfile.parent / GGUF_NAME
    result = ExportResult(modelfile.parent, manifest, "ollama", type, gguf.stat().st_size,
                          [f"run: ollama create {name} -f {modelfile}"])  # fmt: skip
    if verify:
        # A copied GGUF is compared with kompakt's own reading of it (the same weights, dequantized).
        reference = _load(model) if is_gguf else source
        result.check = check_export(reference, result.path, format="ollama", type=_gguf_type(gguf, type),
                                    written=[gguf, modelfile.parent / MODELFILE, manifest])  # fmt: skip
    return result


def _gguf_type(path: Path, default: str) -> str:
    """The type of a GGUF file from its general.file_type (a copied file's own type)."""
    import gguf

    from kompakt.export.gguf_tensors import FILE_TYPES

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return default
    names = {int(gguf.LlamaFileType[name]): type for type, name in FILE_TYPES.items()}
    return names.get(int(field.contents()), default)
