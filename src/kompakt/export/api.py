"""`export(model, format=..., type=..., out=...)`: the one function `kompakt export` calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kompakt.errors import ConfigError, OutputPathError
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
) -> ExportResult:
    """Export a model (a LoadedModel or anything kompakt.model.load accepts; None = embedded default).

    format "gguf": type f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 (default f16), out default
    `<name>-<type>.gguf` in the current directory. format "hf": type f32 | f16 | bf16 (default
    the stored dtype), out default `<name>-<type>/`. format "ollama": a directory with
    model.gguf (a given .gguf is copied; a model is exported with type, default q4_0) and a
    Modelfile (template and stop tokens from the chat template).
    """
    format = format.lower()
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    default_type = {"gguf": "f16", "ollama": "q4_0"}.get(format, "")
    type = (type or default_type).lower() or None
    _check_early(format, type, out, force)
    if format == "ollama":
        return _export_ollama(model, type, out, force)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from kompakt.model.load import load

        loaded = load(model, device="cpu", dtype="float32")
    target = Path(out) if out is not None else default_out(loaded.name, format, type or "hf")
    if format == "gguf":
        result = write_gguf(loaded, target, type=type, force=force)
        return ExportResult(result.path, result.manifest, "gguf", result.type, result.size_bytes, result.notes)
    path = export_hf(loaded, target, type=type, force=force)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return ExportResult(path, manifest_path(path), "hf", type or str(loaded.storage_dtype).removeprefix("torch."), size)


def _export_ollama(model, type: str, out: str | Path | None, force: bool) -> ExportResult:
    from kompakt.export.ollama import GGUF_NAME, export_ollama

    name = model.name if isinstance(model, LoadedModel) else Path(str(model or "smollm2-135m")).stem
    target = Path(out) if out is not None else Path.cwd() / f"{name}-ollama"
    modelfile = export_ollama(model, target, force=force, type=type)
    manifest = write_manifest(modelfile.parent)
    gguf = modelfile.parent / GGUF_NAME
    notes = [f"run: ollama create {name} -f {modelfile}"]
    return ExportResult(modelfile.parent, manifest, "ollama", type, gguf.stat().st_size, notes)
