"""The end of a `compress --target` run: exports (GGUF + a HF directory with its model card),
the measured side-by-side comparison, and the report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kompakt.atomic import atomic_directory, write_text
from kompakt.model.loaded import LoadedModel

if TYPE_CHECKING:
    from kompakt.export.check import ExportCheckError

logger = logging.getLogger(__name__)


def export_result(final: Path, export_type: str | None,
                  out_dir: Path) -> tuple[dict[str, str], ExportCheckError | None]:  # fmt: skip
    """out/export/model.gguf (when the family exports) and out/export/hf (a copy of the final step),
    each reloaded in its runtime and compared with the final model (kompakt.export.check).

    Returns (exports.json's values, the check's one-line ExportCheckError or None): a failed
    export is renamed `<name>.rejected` and recorded, so the caller writes the report showing
    the failure before raising it."""
    from kompakt.export.check import check_run_exports
    from kompakt.export.gguf import write_gguf
    from kompakt.model.load import load
    from kompakt.rundir.layout import MARKER

    exports: dict[str, str] = {}
    target = out_dir / "export"
    hf = target / "hf"
    with atomic_directory(hf, replace=True) as tmp:
        shutil.copytree(final.resolve(), tmp, dirs_exist_ok=True)
        (tmp / MARKER).unlink(missing_ok=True)
    exports["hf"] = str(hf)
    reference = load(final)
    if export_type is not None:
        written = write_gguf(reference, target / "model.gguf", type=export_type, force=True)
        exports["gguf"] = str(written.path)
        exports["gguf_type"] = export_type
        exports["gguf_tensor_types"] = written.types_summary  # the report and the model card list it
        exports["gguf_tensor_types_source"] = "; ".join(f"{k}: {v}" for k, v in written.types_source.items())
    lines, failure = check_run_exports(exports, reference)
    exports.update(lines)
    return exports, failure


def write_card(out_dir: Path, report: dict, base_model: LoadedModel | str | None) -> None:
    """The model card in out/export/hf (when it was not rejected), then its SHA256SUMS."""
    from kompakt.export.manifest import write_manifest
    from kompakt.report.card import model_card

    hf = out_dir / "export" / "hf"
    if hf.is_dir():
        write_text(hf / "README.md", model_card(report, base_model))
        write_manifest(hf)


def measure(original, exports: dict[str, str], metrics: dict[str, Any], out_dir: Path, seed: int) -> dict:
    """comparison.json: the LLM-vs-SLM table, sample generations and the machine."""
    from kompakt.model.load import load
    from kompakt.report.compare import compare, machine, samples

    hf = Path(exports["hf"])
    result = load(hf)
    gguf = Path(exports["gguf"]) if "gguf" in exports else None
    comparison = compare(original, result, hf, gguf, metrics)
    comparison["samples"] = samples(original, result, seed=seed)
    comparison["machine"] = machine()
    write_text(out_dir / "comparison.json", json.dumps(comparison, indent=1, default=str) + "\n")
    return comparison
