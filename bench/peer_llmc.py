"""kompakt side of the llm-compressor side by side: run bench/peers/llmcompressor_run.py in its own
environment (a subprocess of the peer's python) on kompakt's exact calibration blocks, then load
the dense directory it saved with kompakt, so kompakt's evaluator scores both sides.

    model, info = run_peer("/work/peers/llmc/bin/python", "gptq-w4g64", original, blocks, threads=1)
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SCRIPT = Path(__file__).resolve().parent / "peers" / "llmcompressor_run.py"
WORK = Path.home() / ".cache" / "kompakt" / "bench" / "peers"


def run_peer(python: str, method: str, original, blocks: torch.Tensor, threads: int):
    """(LoadedModel of the peer's result, info dict with its oneshot wall / CPU seconds).

    Raises RuntimeError with the peer's last error lines when it fails."""
    from safetensors.torch import save_file

    from kompakt.model.load import load, resolve_model_dir

    source = original.path or resolve_model_dir("smollm2-135m")
    out = WORK / method.replace(":", "_")
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        block_file = Path(tmp) / "blocks.safetensors"
        save_file({"input_ids": blocks.to(torch.int64).contiguous()}, block_file)
        command = [python, str(SCRIPT), "--model", str(source), "--blocks", str(block_file), "--method", method,
                   "--threads", str(threads), "--out", str(out)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-8:]
        raise RuntimeError(f"llm-compressor {method} failed (exit {done.returncode}): " + " | ".join(tail))
    info = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return load(out), info
