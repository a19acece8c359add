"""The end of `compress --target` on a sentence encoder: the result as an int8 ONNX directory
(out/export/onnx-int8), the form it is deployed in, checked in onnxruntime as `kompakt export
--format onnx --type int8` checks it.

Why this file: removing layers is the lever the planner plans speed with, and it stops where
the cosine floor does (all-MiniLM-L6-v2 with the default min-cosine 0.95: 5 of 6 layers, 1.10x
in torch). onnxruntime's dynamic int8 on top runs 2.1x the fp32 graph at batch 32 for 0.007
cosine (bench/onnx_int8.py), so most of the speed a user asked for is in this export; the
report's table then compares it with the original's own ONNX export in onnxruntime
(kompakt.report.compare_encoder), as a decoder's table compares GGUF files in llama.cpp.
`kompakt serve out/export/onnx-int8` serves it on onnxruntime (kompakt.serve.backend_onnx_embed).

Without the encoders extra (onnx, onnxscript, onnxruntime), or for an architecture torch.onnx
cannot trace, nothing is written and exports.json says why (`onnx_note`); the run still
delivers its HF + sentence-transformers directory. A graph that fails its check is kept as
`onnx-int8.rejected` and the run fails after writing the report, as a failed GGUF does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kompakt.errors import ConfigError

if TYPE_CHECKING:
    from kompakt.export.check import ExportCheckError

ONNX_DIR = "onnx-int8"  # under out/export/


def deliver_onnx(final: Path, out_dir: Path) -> tuple[dict[str, str], ExportCheckError | None]:
    """(exports.json's ONNX entries, the check's error or None) for the run's final model."""
    from kompakt.export import export
    from kompakt.export.check import ExportCheckError
    from kompakt.export.onnx import OnnxExportError, require_onnx
    from kompakt.model.load import load

    try:
        require_onnx()
        written = export(load(final), format="onnx", type="int8", out=out_dir / "export" / ONNX_DIR, force=True)
    except (ConfigError, OnnxExportError) as error:
        return {"onnx_note": f"no ONNX export: {error}"}, None
    except ExportCheckError as error:
        return {"onnx_check": str(error)}, error
    return {"onnx": str(written.path), "onnx_type": "int8", "onnx_check": written.check.line()}, None
