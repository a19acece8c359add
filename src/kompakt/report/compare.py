"""The seed's LLM-vs-SLM table, measured: original vs result, side by side.

Speed and peak memory come from `kompakt.report.probe` (a fresh process per model, the same
runtime for both: llama.cpp when both have a GGUF and llama-cpp-python is installed, else
transformers). Quality comes from the run's last evaluation (KL and top-1 against the
original on held-out text). Energy per 1k generated tokens is an estimate: measured time x a
stated power figure (`KOMPAKT_WATTS`, default 10 W per busy CPU core, 300 W for a GPU).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from kompakt.model.loaded import LoadedModel
from kompakt.report.footprint import energy_per_1k, hardware_needed, power_watts

logger = logging.getLogger(__name__)

PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "Give three tips for learning a new language.",
)
SAMPLE_TOKENS = 48


def _probe_pair(original: LoadedModel, result_dir: Path, result_gguf: Path | None, threads: int, scratch: Path) -> tuple[dict, dict]:
    from kompakt.report.probe import probe

    if result_gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        from kompakt.export.gguf import export_gguf

        original_gguf = export_gguf(original, scratch / "original-f16.gguf", type="f16", force=True)
        return probe(original_gguf, "llamacpp", threads), probe(result_gguf, "llamacpp", threads)
    return probe(original.path, "transformers", threads), probe(result_dir, "transformers", threads)


def samples(original: LoadedModel, result: LoadedModel, seed: int = 0) -> list[dict[str, str]]:
    """Greedy continuations of the same prompts by both models (chat template when there is one);
    none for sentence encoders, which do not generate."""
    from kompakt.serve.generate import generate_text, has_chat_template

    if original.is_encoder:
        return []

    rows = []
    for prompt in PROMPTS:
        query: Any = [{"role": "user", "content": prompt}] if has_chat_template(original.tokenizer) else prompt
        row = {"prompt": prompt}
        for key, loaded in (("original", original), ("result", result)):
            row[key] = generate_text(loaded, query, max_new_tokens=SAMPLE_TOKENS, temperature=0.0, seed=seed).strip()
        rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    import transformers

    import kompakt

    return {
        "platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "kompakt": getattr(kompakt, "__version__", "0.1.0"), "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip


def compare(original: LoadedModel, result: LoadedModel, result_dir: Path, result_gguf: Path | None,
            metrics: dict[str, Any], threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure both models and return the comparison (JSON-able): rows, samples, notes. Sentence
    encoders get the table's encoder form (kompakt.report.compare_encoder)."""
    from kompakt.evaluate import disk_bytes

    if original.is_encoder:
        from kompakt.report.compare_encoder import compare_encoder

        return compare_encoder(original, result, result_dir, metrics, threads)

    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="kompakt-compare-") as scratch:
        speed_o, speed_r = _probe_pair(original, result_dir, result_gguf, threads, Path(scratch))
    watts, watts_note = power_watts(threads)
    size_r = result_gguf.stat().st_size if result_gguf is not None else disk_bytes(result_dir)
    values = {
        "parameters": (original.num_parameters(), result.num_parameters()),
        "size_bytes": (original.num_parameters() * 2, size_r),
        "peak_memory_bytes": (speed_o.get("peak_rss_bytes"), speed_r.get("peak_rss_bytes")),
        "prefill_tps": (speed_o.get("prefill_tps"), speed_r.get("prefill_tps")),
        "generate_tps": (speed_o.get("generate_tps"), speed_r.get("generate_tps")),
        "ppl": (metrics.get("ppl_reference"), metrics.get("ppl")),
        "kl_mean": (0.0, metrics.get("kl_mean")),
        "top1": (1.0, metrics.get("top1")),
        "energy_j_per_1k": (energy_per_1k(speed_o.get("generate_tps"), watts), energy_per_1k(speed_r.get("generate_tps"), watts)),
    }  # fmt: skip
    hardware = (hardware_needed(values["peak_memory_bytes"][0]), hardware_needed(values["peak_memory_bytes"][1]))
    notes = [
        f"size: the original in fp16 ({values['size_bytes'][0] / 1e6:.1f} MB) vs the result as "
        + ("its GGUF file" if result_gguf is not None else "its saved directory"),
        f"speed and peak memory: {speed_o.get('backend', '?')}, {threads} threads, a fresh process per model "
        f"({speed_o.get('prompt_tokens', '?')}-token prompt, {speed_o.get('gen_tokens', '?')} generated tokens)",
        f"energy is an estimate: time per 1k generated tokens x {watts_note}",
    ]
    for side, probed in (("original", speed_o), ("result", speed_r)):
        if "error" in probed:
            notes.append(f"{side} speed/memory not measured: {probed['error']}")
    return {"values": values, "hardware": hardware, "backend": speed_o.get("backend"), "threads": threads,
            "watts": watts, "notes": notes, "probes": {"original": speed_o, "result": speed_r}}  # fmt: skip
