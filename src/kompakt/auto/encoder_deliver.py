"""The end of `compress --target` on a sentence encoder: the result as an int8 ONNX directory
(out/export/onnx-int8), the form it is deployed in, checked in onnxruntime as `kompakt export
--format onnx --type int8` checks it.

Why this file: onnxruntime's dynamic int8 runs all-MiniLM-L6-v2 2.1x its fp32 graph at batch 32
for 0.007 cosine (bench/onnx_int8.py), so much of the speed a user asks for is in this export:
the planner counts it (kompakt.auto.encoder_int8) and the floor is judged on this graph's
embeddings of the run's held-out sentences (`deliver`). The report's table then compares it
with the original's own ONNX export in onnxruntime (kompakt.report.compare_encoder), as a
decoder's table compares GGUF files in llama.cpp.
`kompakt serve out/export/onnx-int8` serves it on onnxruntime (kompakt.serve.backend_onnx_embed).

Without the encoders extra (onnx, onnxscript, onnxruntime), or for an architecture torch.onnx
cannot trace, nothing is written and exports.json says why (`onnx_note`); the run still
delivers its HF + sentence-transformers directory. A graph that fails its check is kept as
`onnx-int8.rejected` and the run fails after writing the report, as a failed GGUF does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kompakt.errors import ConfigError

if TYPE_CHECKING:
    from kompakt.export.check import ExportCheckError
    from kompakt.recipe.encoder_measure import EncoderMeasurer

ONNX_DIR = "onnx-int8"  # under out/export/


@dataclass
class Delivery:
    """What deliver() wrote: exports.json's ONNX entries, the check's error (None when it passed
    or nothing was written), and the int8 graph's fidelity on the held-out sentences in the step
    metrics' names (None without a graph)."""

    exports: dict[str, str]
    failed: ExportCheckError | None = None
    fidelity: dict[str, Any] | None = None


def deliver(final: Path, out_dir: Path, held_out: EncoderMeasurer) -> Delivery:
    """Export `final` as int8 ONNX to out/export/onnx-int8 (replacing an earlier attempt's) and score
    the graph against the original's embeddings of the run's held-out sentences."""
    exports, failed = deliver_onnx(final, out_dir)
    if "onnx" not in exports:
        return Delivery(exports, failed)
    sentences, where = held_out.data.eval_sentences()
    return Delivery(exports, failed, onnx_fidelity(Path(exports["onnx"]), sentences, where, held_out.reference()))


def onnx_fidelity(directory: Path, sentences: list[str], where: str, reference) -> dict[str, Any]:
    """An ONNX export's embeddings of `sentences` against `reference` [n, d], named as
    kompakt.recipe.encoder_measure names a step's metrics."""
    import torch

    from kompakt.evaluate.embedding_fidelity import embedding_fidelity
    from kompakt.export.onnx import MODEL_FILE
    from kompakt.export.onnx_speed import onnx_embed
    from kompakt.recipe.encoder_measure import fidelity_metrics

    ours = torch.from_numpy(onnx_embed(directory / MODEL_FILE, sentences)).float()
    return fidelity_metrics(embedding_fidelity(ours, reference.float(), k=10), where)


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
