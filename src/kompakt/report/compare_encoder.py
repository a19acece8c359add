"""The seed's LLM-vs-SLM table in its encoder form: the original sentence encoder vs the result.

Rows: parameters, size on disk, peak memory while embedding, the RAM that holds it, sentences/s
at batch 1 (a search query) and batch 32 (indexing), the embeddings' fidelity to the original
(mean cosine, neighbour recall@10, Spearman of pair similarities) and an energy estimate per
1k sentences. Speed and peak memory come from `kompakt.report.probe` (a fresh process per
model, transformers on CPU or GPU as the machine has it, on the run's held-out sentences when
the caller gives them, since what int8 or fewer layers gain depends on sentence length, else
kompakt's shipped held-out set);
fidelity comes from the run's last evaluation when it holds the encoder metrics, else it is
measured here on the same held-out sentences (`kompakt.evaluate.evaluate_encoder`).

With `deployed` (the int8 ONNX a `compress --target` run delivers, kompakt.auto.encoder_deliver)
the table compares what a user deploys, as the decoder table compares GGUF files in llama.cpp:
the result is that directory in onnxruntime, the original its own fp32 ONNX export in
onnxruntime (written to a scratch directory), each in a fresh process; size is the int8 file;
fidelity is the int8 graph's embeddings of the run's held-out sentences against the
original's, as the run measured them to judge its floor. Both probes import torch (transformers' tokenizer does), so both peaks hold the
same ≈ 0.4 GB a torch-free onnxruntime process would not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kompakt.model.loaded import LoadedModel
from kompakt.report.footprint import energy_per_1k, hardware_needed, power_watts

logger = logging.getLogger(__name__)

ENCODER = "encoder"  # comparison["kind"]: kompakt.report.document picks the encoder rows by it


def _fidelity(original: LoadedModel, result: LoadedModel, metrics: dict[str, Any]) -> tuple[dict, str]:
    """(cosine_mean, recall_at_k, k, spearman, data) of result vs original, and where from. A run's
    step metrics (kompakt.recipe) name recall "recall_at_10" and the text "eval_text"."""
    recall = metrics.get("recall_at_k", metrics.get("recall_at_10"))
    if recall is not None and metrics.get("spearman") is not None:
        k = metrics.get("k") or 10
        data = metrics.get("data") or metrics.get("eval_text") or "the run's held-out sentences"
        return {**metrics, "recall_at_k": recall, "k": k, "data": data}, "the run's last evaluation"
    from kompakt.evaluate.encoder_api import evaluate_encoder

    measured = evaluate_encoder(result, original, speed=False).to_dict()
    return measured, "measured for this report"


def _original_bytes(original: LoadedModel) -> int:
    """The original's weight files on disk; in memory when it was never saved."""
    from kompakt.evaluate import disk_bytes, parameter_bytes

    return disk_bytes(original.path) or parameter_bytes(original.model)


@dataclass
class OnnxDeployment:
    """The delivered ONNX directory and its fidelity to the original on the run's held-out
    sentences, in a step's metric names (kompakt.auto.encoder_deliver.onnx_fidelity)."""

    directory: Path
    fidelity: dict[str, Any]


def _probe_onnx(original: LoadedModel, onnx_dir: Path, threads: int, sentences: list[str] | None) -> tuple[dict, dict]:
    """(original as fp32 ONNX, the delivered int8 ONNX), each probed in onnxruntime."""
    import tempfile

    from kompakt.export.onnx import write_onnx
    from kompakt.report.probe import probe

    with tempfile.TemporaryDirectory(prefix="kompakt-compare-") as scratch:
        written = write_onnx(original, Path(scratch) / "original", type="f32")
        return (probe(written.directory, "onnxruntime", threads, sentences=sentences),
                probe(onnx_dir, "onnxruntime", threads, sentences=sentences))  # fmt: skip


def compare_encoder(original: LoadedModel, result: LoadedModel, result_dir: Path, metrics: dict[str, Any],
                    threads: int | None = None, deployed: OnnxDeployment | None = None,
                    timing: tuple[list[str], str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure both encoders and return the comparison (JSON-able): kind, values, hardware, notes;
    with `deployed`, of the delivered ONNX as the module docstring says; speed timed on
    `timing`'s sentences (and where they are from), else on kompakt's shipped held-out set."""
    from kompakt.evaluate import disk_bytes
    from kompakt.export.onnx import onnx_bytes
    from kompakt.report.probe import probe

    threads = threads or torch.get_num_threads()
    sentences, timed_on = timing if timing is not None else (None, "kompakt's shipped held-out sentences")
    if deployed is not None:
        speed_o, speed_r = _probe_onnx(original, deployed.directory, threads, sentences)
        fid, _ = _fidelity(original, result, deployed.fidelity)
        fid_source = "the int8 ONNX export's embeddings, as the run judged its floor on"
        size_r = onnx_bytes(deployed.directory)
    else:
        speed_o = (probe(original.path, "transformers", threads, sentences=sentences) if original.path
                   else {"error": "the original is not saved"})  # fmt: skip
        speed_r = probe(result_dir, "transformers", threads, sentences=sentences)
        fid, fid_source = _fidelity(original, result, metrics)
        size_r = disk_bytes(result_dir)
    watts, watts_note = power_watts(threads)
    k = fid.get("k") or 10
    values = {
        "parameters": (original.num_parameters(), result.num_parameters()),
        "size_bytes": (_original_bytes(original), size_r),
        "peak_memory_bytes": (speed_o.get("peak_rss_bytes"), speed_r.get("peak_rss_bytes")),
        "sentences_b1_per_s": (speed_o.get("sentences_b1_per_s"), speed_r.get("sentences_b1_per_s")),
        "sentences_b32_per_s": (speed_o.get("sentences_b32_per_s"), speed_r.get("sentences_b32_per_s")),
        "cosine_mean": (1.0, fid.get("cosine_mean")),
        "recall_at_k": (1.0, fid.get("recall_at_k")),
        "spearman": (1.0, fid.get("spearman")),
        "energy_j_per_1k": (energy_per_1k(speed_o.get("sentences_b32_per_s"), watts),
                            energy_per_1k(speed_r.get("sentences_b32_per_s"), watts)),
    }  # fmt: skip
    hardware = (hardware_needed(values["peak_memory_bytes"][0]), hardware_needed(values["peak_memory_bytes"][1]))
    notes = [
        "size: the original's weight files as saved vs the result's int8 ONNX file" if deployed is not None
        else "size: the weight files of both directories as saved",
        "speed and peak memory: " + ("the original as its fp32 ONNX export vs the result's int8 ONNX, " if deployed is not None else "")
        + f"{speed_o.get('backend', speed_r.get('backend', '?'))}, {threads} threads, a fresh "
        f"process per model, {timed_on} ({speed_r.get('batch1_sentences', '?')} one at a time, "
        f"{speed_r.get('batched_sentences', '?')} in batches of 32, best of 3)"
        + ("; each process also holds torch (≈ 0.4 GB, imported by transformers' tokenizer)" if deployed is not None else ""),
        f"fidelity ({fid_source}): {fid.get('data', 'held-out sentences')}; recall@{k} of the original's "
        f"{k} nearest neighbours, Spearman of the similarities of "
        + (f"{fid['pairs']:,} sentence pairs" if fid.get("pairs") else "sentence pairs"),
        f"energy is an estimate: time per 1k sentences at batch 32 x {watts_note}",
    ]
    if fid.get("cosine_mean") is None:
        notes.append("cosine: not defined, the result embeds into a space of another width")
    for side, probed in (("original", speed_o), ("result", speed_r)):
        if "error" in probed:
            notes.append(f"{side} speed/memory not measured: {probed['error']}")
    return {"kind": ENCODER, "k": k, "values": values, "hardware": hardware,
            "backend": speed_r.get("backend"), "threads": threads, "watts": watts, "notes": notes,
            "probes": {"original": speed_o, "result": speed_r}}  # fmt: skip
