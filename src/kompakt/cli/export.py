"""`kompakt export`: write a model as GGUF (llama.cpp / Ollama) or as a Hugging Face directory."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

HELP = (
    "Export a model: GGUF for llama.cpp (f32 f16 bf16 q8_0 q6_k q5_1 q5_k q5_0 q4_1 q4_k iq4_nl q4_0 q3_k q2_k, "
    "per tensor with --tensor-type), a model's LoRA adapter for llama.cpp's --lora (gguf-lora), an Ollama "
    "directory (GGUF + Modelfile), a Hugging Face directory, or a sentence encoder as ONNX (onnxruntime, f32 or int8)."
)
MODEL_HELP = "Model directory, .gguf file or embedded name (default: smollm2-135m)."
TYPE_HELP = "gguf: f32 f16 bf16 q8_0 q6_k q5_1 q5_k q5_0 q4_1 q4_k iq4_nl q4_0 q3_k q2_k (default f16); gguf-lora: f16 f32 q8_0 (default f16; q8_0 = lora_a in q8_0, lora_b in f16); hf: f32 f16 bf16 (default: as stored); onnx: f32 int8 (default f32; int8 = onnxruntime's dynamic quantization)."
TENSOR_TYPE_HELP = (
    "gguf: PATTERN=TYPE, the type of the tensors whose GGUF name (or HF name) the regex PATTERN matches, "
    "as llama-quantize's --tensor-type (e.g. ffn_down=q5_0, token_embd=q4_0); repeatable, first match wins, "
    "above the model's own per-tensor types and --type."
)
NO_VERIFY_HELP = (
    "Skip the check that reloads the export in its runtime (llama.cpp, transformers, onnxruntime) and compares "
    "its next-token predictions (or sentence embeddings) with the original."
)
MERGE_HELP = (
    "Write a factorized (lowrank.svd) or shared (share.layers) model as its dense equivalent: llama.cpp and plain "
    "transformers have no such layers, so such a model is refused without it; the file is back to full size. "
    "ONNX runs them as they are (no --merge needed)."
)
BASE_HELP = "gguf-lora: the base .gguf the adapter will run on; its tensor names and shapes are checked first."
MAX_MEMORY_HELP = (
    "RAM the export may use, e.g. 6GB (default: what is available now). A model directory is written to GGUF one "
    "tensor at a time whatever its size; the check that compares the file with the original loads the original "
    "only when it fits."
)
IMATRIX_HELP = (
    "gguf: round the quantized tensors with this llama.cpp importance matrix (from `kompakt imatrix` or "
    "llama-imatrix, GGUF or .dat), the bytes `llama-quantize --imatrix` writes."
)
OUT_HELP = (
    "Output file (gguf) or directory (hf, ollama, onnx: model.onnx + tokenizer); default <model>-<type>[.gguf] "
    "(onnx: <model>-onnx-<type>) in the current directory."
)


def register(app: typer.Typer) -> None:
    @app.command("export", help=HELP)
    def export_command(
        model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
        format: str = typer.Option("gguf", "--format", "-f", help="gguf, gguf-lora, ollama, hf or onnx."),
        type: Optional[str] = typer.Option(None, "--type", "-t", help=TYPE_HELP),
        out: Optional[str] = typer.Option(None, "--out", "-o", help=OUT_HELP),
        force: bool = typer.Option(False, "--force", help="Replace an existing output."),
        no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
        tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help=TENSOR_TYPE_HELP),
        merge: bool = typer.Option(False, "--merge", help=MERGE_HELP),
        base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
        imatrix: Optional[str] = typer.Option(None, "--imatrix", help=IMATRIX_HELP),
    ) -> None:
        from kompakt.export.api import export

        result = export(model, format=format, type=type, out=out, force=force, verify=not no_verify,
                        tensor_types=tensor_type, merge=merge, base=base, max_memory=max_memory,
                        imatrix=imatrix)  # fmt: skip
        console = Console()
        for note in result.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        size = f"{result.size_bytes / 1e6:,.1f} MB"
        console.print(f"wrote {result.path} ({result.format} {result.type}, {size})", highlight=False, soft_wrap=True)
        if result.types_summary:
            console.print(f"tensor types: {result.types_summary}", highlight=False, soft_wrap=True)
        console.print(f"sha256 manifest: {result.manifest}", highlight=False, soft_wrap=True)
        if result.check is not None:
            console.print(f"check: {result.check.line()}", highlight=False, soft_wrap=True)
            for note in result.check.notes:
                console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
