"""Streaming GGUF export of a Llama-shaped model several times larger than the export's memory:
random bf16 weights written shard by shard (never whole in memory), then `kompakt export` of
it in a fresh process (peak RSS = VmHWM), then the file loaded in llama.cpp and run.

    .venv/bin/python bench/streaming_synthetic.py [--hidden 2048 --layers 16 --mlp 5632 --vocab 32000] [--type q4_0]

The default shape (~1 B parameters, 2.1 GB in bf16, 4.1 GB in fp32) keeps the run to a few CPU-minutes;
--hidden 4096 --layers 32 --mlp 11008 is Llama 2 7B. Writes bench/results/streaming-synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_EXPORT = """
import json, sys, time
from kompakt.process_memory import high_water_mark, reset_high_water_mark
import kompakt.export.api, kompakt.export.gguf_stream, kompakt.model.lazy
reset_high_water_mark(); base = high_water_mark(); start = time.perf_counter()
from kompakt.export.api import export
result = export(sys.argv[1], format="gguf", type=sys.argv[2], out=sys.argv[3], verify=False, force=True)
print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss": high_water_mark(), "base_rss": base,
                  "size": result.size_bytes}))
"""
_RUN = """
import json, sys, time
from llama_cpp import Llama
start = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
out = llm.create_completion("The", max_tokens=8, temperature=0.0)
print(json.dumps({"generated_tokens": out["usage"]["completion_tokens"], "wall_s": time.perf_counter() - start}))
"""


def write_model(directory: Path, hidden: int, layers: int, mlp: int, vocab: int, heads: int, kv: int) -> int:
    """A Llama config, the tiny byte tokenizer and random bf16 weights, one shard per layer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from kompakt.model.tiny import tiny_tokenizer

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    dim = hidden // heads

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"layer-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(heads * dim, hidden), p + "self_attn.k_proj.weight": rand(kv * dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv * dim, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * dim),
            p + "mlp.gate_proj.weight": rand(mlp, hidden), p + "mlp.up_proj.weight": rand(mlp, hidden),
            p + "mlp.down_proj.weight": rand(hidden, mlp),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })  # fmt: skip
    shard("head.safetensors", {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                               "lm_head.weight": rand(vocab, hidden)})  # fmt: skip
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--type", default="q4_0")
    parser.add_argument("--work", default=None, help="directory for the model and the GGUF (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        model_dir = Path(tmp) / "llama-synthetic"
        model_dir.mkdir()
        start = time.perf_counter()
        stored = write_model(model_dir, args.hidden, args.layers, args.mlp, args.vocab, args.heads, args.kv_heads)
        written_s = time.perf_counter() - start
        gguf = Path(tmp) / f"synthetic-{args.type}.gguf"
        export = _run(_EXPORT, str(model_dir), args.type, str(gguf))
        run = _run(_RUN, str(gguf))
    result = {"shape": vars(args), "stored_bytes_bf16": stored, "fp32_bytes": stored * 2, "write_s": written_s,
              "export": export, "llama_cpp": run}  # fmt: skip
    print(f"model: {stored / 1e9:.2f} GB bf16 on disk ({stored * 2 / 1e9:.2f} GB in fp32), written in {written_s:.0f} s")
    print(f"kompakt export --type {args.type} (streamed): peak RSS {export['peak_rss'] / 1e6:.0f} MB "
          f"({(export['peak_rss'] - export['base_rss']) / 1e6:.0f} MB above imports), {export['wall_s']:.1f} s, "
          f"file {export['size'] / 1e9:.2f} GB")  # fmt: skip
    print(f"llama.cpp: loaded and generated {run['generated_tokens']} tokens in {run['wall_s']:.1f} s")
    out = REPO / "bench" / "results" / "streaming-synthetic.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
