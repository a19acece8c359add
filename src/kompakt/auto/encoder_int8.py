"""What the delivered int8 ONNX gives the original encoder, measured when `compress --target
speed=` is planned: its speed-up over the original's own fp32 ONNX in onnxruntime, and its mean
cosine to the original's embeddings.

Why: a `compress --target` run on an encoder delivers int8 ONNX (kompakt.auto.encoder_deliver)
and its report compares that file with the original's fp32 ONNX. onnxruntime's dynamic int8 alone
runs all-MiniLM-L6-v2 2.1x its fp32 graph at batch 32 for 0.007 cosine (bench/onnx_int8.py),
while removing half the layers costs 0.06 cosine after distillation. So the planner cuts only the
layers the int8 graph leaves to cut, and none when it alone reaches the target. The gain depends
on the CPU (int8 dot-product instructions or not), so it is measured on this machine, not assumed.

Measured on the timing sentences (512 of --data's training sentences, else short ones), batch 32, the
threads torch uses, fp32 and int8 timed in turns (best of ROUNDS each) in this process.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel

ROUNDS = 3
BATCH = 32


@dataclass
class Int8Gain:
    """int8 ONNX against fp32 ONNX of the same model: sentences/s ratio and mean cosine; or, when it
    could not be measured, why (speedup and cosine None)."""

    speedup: float | None
    cosine: float | None
    note: str = ""


def measure_int8_gain(loaded: LoadedModel, sentences: list[str]) -> Int8Gain:
    """Export `loaded` to fp32 and int8 ONNX in a scratch directory, time both, compare embeddings."""
    from kompakt.export.onnx import MODEL_FILE, OnnxExportError, require_onnx, write_onnx
    from kompakt.export.onnx_speed import batched_rate, onnx_runner
    from kompakt.model.encode import embed

    try:
        require_onnx()
        with tempfile.TemporaryDirectory(prefix="kompakt-int8-gain-") as scratch:
            paths = [write_onnx(loaded, Path(scratch) / kind, type=kind).directory / MODEL_FILE for kind in ("f32", "int8")]
            threads = torch.get_num_threads()
            f32, int8 = (onnx_runner(path, threads) for path in paths)
            rates: dict[str, list[float]] = {"f32": [], "int8": []}
            for _ in range(ROUNDS):  # in turns: a load change on a shared machine hits both alike
                rates["f32"].append(batched_rate(f32, sentences, BATCH))
                rates["int8"].append(batched_rate(int8, sentences, BATCH))
            ours = torch.from_numpy(int8(sentences)).float()
    except (ConfigError, OnnxExportError) as error:
        return Int8Gain(None, None, str(error))
    cosine = torch.nn.functional.cosine_similarity(ours, embed(loaded, sentences).float(), dim=-1).mean().item()
    return Int8Gain(max(rates["int8"]) / max(rates["f32"]), cosine)
