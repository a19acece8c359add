"""Run one llm-compressor oneshot method on given calibration blocks; save a plain dense HF dir.

Runs INSIDE the peer environment (bench/peers/requirements-llmcompressor.txt), not kompakt's:
llm-compressor pins an older transformers. kompakt's benches call it in a subprocess
(`--peer /work/peers/llmc/bin/python`) and then evaluate the saved directory with kompakt's
own evaluator, so both sides see the same model, the same calibration tokens and the same
evaluator.

    python bench/peers/llmcompressor_run.py --model DIR --blocks calib.safetensors \
        --method gptq-w4g64 --threads 1 --out OUT_DIR

--blocks: a safetensors file holding `input_ids` [n_blocks, block_len] (int64), the exact
BENCH.md calibration blocks written by the kompakt side; they are passed to oneshot as a
pre-tokenized dataset (no shuffling, no resampling, no truncation).

Methods: gptq-w4g64 / gptq-w4g128 (GPTQModifier, int4 weights, groups of 64 / 128, symmetric, every Linear but
lm_head; llm-compressor's defaults otherwise: block 128, damping 0.01, static act-order),
sparsegpt-50 / sparsegpt-2:4 (SparseGPTModifier), wanda-50 / wanda-2:4 (WandaPruningModifier),
all on the decoder Linears (lm_head excluded).

The output is a plain HF directory (config.json without a quantization_config, fp32
safetensors, tokenizer): every quantized weight written as its dequantized values, so any
evaluator reads it as a dense model (`--no-save`: nothing is written, for a time and memory run).
`--dtype auto` loads the model in its stored dtype, as llm-compressor's examples do
(`torch_dtype="auto"`; a bf16 7B model is then 13.5 GB in RAM: on a machine without a GPU the whole
model stays in memory, its sequential pipeline onloads layers only to an accelerator).
Prints one JSON line: {"seconds": oneshot wall time, "peak_rss": VmHWM bytes before saving, ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

METHODS = ("gptq-w4g64", "gptq-w4g128", "sparsegpt-50", "sparsegpt-2:4", "wanda-50", "wanda-2:4")


def make_recipe(method: str):
    if method.startswith("gptq-w4g"):
        from llmcompressor.modifiers.quantization import GPTQModifier

        group = int(method.removeprefix("gptq-w4g"))
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
        return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    kind, pattern = method.split("-")
    mask = "2:4" if pattern == "2:4" else "0:0"
    if kind == "sparsegpt":
        from llmcompressor.modifiers.obcq import SparseGPTModifier

        return SparseGPTModifier(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])


@torch.no_grad()
def dense_state(model) -> dict[str, torch.Tensor]:
    """The model's plain weights, quantized Linears as their dequantized (on-grid) values."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            # GPTQ already wrote its dequantized values into `weight`; re-applying the grid is a
            # no-op then, and makes sure what is saved is on the grid in any case.
            zero = getattr(module, "weight_zero_point", None)
            weight = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights)
            state[f"{name}.weight"] = weight.detach().float().contiguous()
    for key, tensor in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith(("weight_", "input_", "output_")) or key in state:
            continue
        state[key] = tensor.detach().float().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_dense(model, source: Path, out: Path) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(dense_state(model), tmp / "model.safetensors", metadata={"format": "pt"})
    for file in source.iterdir():  # config (unchanged: same architecture) and tokenizer files
        if file.suffix != ".safetensors" and file.is_file() and not file.name.startswith("."):
            shutil.copy2(file, tmp / file.name)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _vm_hwm() -> int | None:
    """This process's peak RSS in bytes (Linux VmHWM), None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0]) * 1024 if "VmHWM:" in status else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp32 HF directory of the original")
    parser.add_argument("--blocks", type=Path, required=True, help="safetensors with input_ids [n, len]")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["float32", "auto"], default="float32", help="dtype the model is loaded in")
    parser.add_argument("--no-save", action="store_true", help="write nothing (a time and memory run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blocks = load_file(args.blocks)["input_ids"].long()
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if args.dtype == "float32" else "auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start, start_cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=make_recipe(args.method),
            num_calibration_samples=blocks.shape[0], max_seq_length=blocks.shape[1],
            shuffle_calibration_samples=False)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = _vm_hwm()
    if not args.no_save:
        save_dense(model, args.model, args.out)
    print(json.dumps({"method": args.method, "seconds": seconds, "cpu_seconds": cpu, "threads": args.threads,
                      "peak_rss": peak, "dtype": str(next(model.parameters()).dtype),
                      "blocks": list(blocks.shape), "llmcompressor": llmcompressor.__version__,
                      "torch": torch.__version__, "out": str(args.out)}))  # fmt: skip


if __name__ == "__main__":
    main()
