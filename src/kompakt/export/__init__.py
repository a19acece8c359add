"""Exports: GGUF for llama.cpp / Ollama, Hugging Face directories, sha256 manifests beside every
exported file, and the check that reloads each export in its runtime."""

from __future__ import annotations

from kompakt.callable_package import make_package_callable
from kompakt.export.api import export
from kompakt.export.check import ExportCheck, ExportCheckError, check_export
from kompakt.export.gguf import GGUFExport, export_gguf, prepare_gguf, write_gguf
from kompakt.export.manifest import sha256_file, verify_manifest, write_manifest

__all__ = [
    "ExportCheck", "ExportCheckError", "GGUFExport", "check_export", "export", "export_gguf", "prepare_gguf",
    "write_gguf", "sha256_file", "verify_manifest", "write_manifest",
]  # fmt: skip

make_package_callable(__name__, export)  # kompakt.export(...) after `import kompakt.export`
