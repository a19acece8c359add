"""`kompakt imatrix`: a model's calibration statistics as a llama.cpp importance matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

HELP = "Write a llama.cpp importance matrix (for llama-quantize --imatrix) from kompakt's calibration."


def imatrix_command(
    model: Optional[str] = typer.Argument(None, help="HF directory, .gguf file, embedded name or hub id (default: smollm2-135m)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration text (txt, jsonl, parquet, HF dataset dir); default: self-generated."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file: .gguf (llama.cpp's current format) or .dat (legacy); default ./<model>.imatrix.gguf."),
    blocks: int = typer.Option(128, "--blocks", help="Calibration blocks (llama-imatrix chunks)."),
    block_len: int = typer.Option(512, "--block-len", help="Tokens per calibration block (llama-imatrix -c)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the block sampling and of self-generated text."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Convert this llama.cpp imatrix (GGUF or .dat), checked against MODEL, instead of computing one."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Compute a model's importance matrix (Σ x² per input channel of every decoder Linear) and write it."""
    from kompakt.export.imatrix import export_imatrix

    result = export_imatrix(model, out=out, data=data, n_blocks=blocks, block_len=block_len, seed=seed,
                            imatrix=imatrix, force=force)  # fmt: skip
    if result.converted_from is not None:
        source = f"converted from {result.converted_from}"
    else:
        source = f"{result.chunks} x {result.chunk_size} tokens of {', '.join(result.datasets)}"
    Console().print(f"wrote {result.path} ({result.tensors} tensors; {source})", highlight=False, soft_wrap=True)
    Console().print(f"use it: llama-quantize --imatrix {result.path} model-f16.gguf out.gguf Q4_K_M",
                    highlight=False, soft_wrap=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command(name="imatrix", help=HELP)(imatrix_command)
