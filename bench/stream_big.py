"""A model larger than memory (issue 14): streamed GPTQ W4 g128 on a generated 7B-shaped model.

Generates a Llama-shaped model with random bf16 weights, written shard by shard (one safetensors
shard per decoder layer, never whole in memory; the weights are N(0, 0.02), norms 1), then runs
`kompakt compress MODEL --step quant.gptq:bits=4,group_size=128 --max-memory ...` through the
recipe runner (kompakt.recipe.stream_run: one decoder layer materialised at a time, the result
written shard by shard) with 16 x 512 calibration tokens of WikiText-2 validation (BENCH.md's
sampling). Then the generated model is exported to GGUF (`--export q4_0`, tensor by tensor:
kompakt.export.gguf_stream), the GGUF is loaded in llama.cpp (llama-cpp-python) and generates 16
tokens, and the GPTQ result's perplexity is measured over `--ppl-tokens` tokens of WikiText-2
test, layer by layer (kompakt.evaluate.streamed). Each phase runs in its own process, so its peak
RSS (VmHWM) is its own; the GPTQ phase also records where its peak was (`peak_at`).

    .venv/bin/python bench/stream_big.py --preset llama2-7b          # 13.5 GB on disk + 3.9 GB result
    .venv/bin/python bench/stream_big.py --preset mistral-7b
    .venv/bin/python bench/stream_big.py --preset llama2-7b --layers 2 --calib-blocks 4 --block-len 128
    python bench/stream_big.py --preset llama2-7b --device cuda --export none   # layers onloaded to the GPU
    .venv/bin/python bench/stream_big.py --preset llama2-7b --layers 2 --export none --ppl-tokens 0 \
        --peer /work/peers/llmc/bin/python      # + llm-compressor's oneshot GPTQ on the same model

Presets: llama2-7b (hidden 4096, 32 layers, MLP 11008, 32 heads, vocab 32000: the published
Llama 2 7B config) and mistral-7b (GQA with 8 KV heads, MLP 14336); `--layers` keeps a preset's
per-layer shapes (so per-layer memory stays realistic) with fewer layers. The tokenizer is
kompakt's tiny byte-level one (ids < 272): the weights are random, so only memory and time
mean anything here, not quality.

Prints a table and writes bench/results/stream_big-<preset>[-<layers>L][-peer].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
PRESETS = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip


def _peak_rss() -> int:
    from kompakt.process_memory import high_water_mark, max_rss_lifetime

    return high_water_mark() or max_rss_lifetime()


def watch_peak() -> dict:
    """Where the main thread is when the resident size reaches a new high (sampled every 20 ms:
    tracemalloc does not see torch's memory): `where["at"]` is the innermost kompakt frame at the peak."""
    import threading
    import traceback

    where = {"rss": 0, "at": ""}
    main = threading.main_thread().ident

    def sample() -> None:
        status = Path("/proc/self/status")
        while True:
            rss = int(status.read_text().split("VmRSS:")[1].split()[0]) * 1024
            if rss > where["rss"]:
                frame = sys._current_frames().get(main)
                frames = [f for f in traceback.extract_stack(frame) if "/kompakt/" in f.filename] if frame else []
                del frame  # a frame object kept here would keep its locals (the solver's tensors) alive
                at = frames[-1] if frames else None
                where.update(rss=rss, at=f"{at.filename.split('/kompakt/')[-1]}:{at.lineno} {at.name}" if at else "")
            time.sleep(0.02)

    if Path("/proc/self/status").exists():
        threading.Thread(target=sample, daemon=True).start()
    return where


def generate(directory: Path, shape: dict, seed: int = 0) -> dict:
    """Write the model shard by shard: peak memory is one tensor in fp32, not the model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from kompakt.model.tiny import tiny_tokenizer

    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    shape = dict(shape)
    model_type = shape.pop("model_type")
    config = AutoConfig.for_model(model_type, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, **shape)  # fmt: skip
    config.dtype = "bfloat16"
    generator = torch.Generator().manual_seed(seed)
    h, m, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=generator) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    n = shape["num_hidden_layers"]
    files = n + 2
    write(f"model-00001-of-{files:05d}.safetensors", {"model.embed_tokens.weight": rand(v, h)})
    for i in range(n):
        p = f"model.layers.{i}."
        write(f"model-{i + 2:05d}-of-{files:05d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })  # fmt: skip
    write(f"model-{files:05d}-of-{files:05d}.safetensors",
          {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)})  # fmt: skip
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return {"bytes": total, "seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "shards": files}


def quantize(model: Path, out: Path, calib_blocks: int, block_len: int, max_memory: str, threads: int,
             device: str = "cpu", data: Path = DATA) -> dict:  # fmt: skip
    """Streamed GPTQ W4 g128 through the recipe runner, as `kompakt compress --max-memory --device` runs
    it (on a GPU each layer is onloaded there; its peak memory is recorded too)."""
    import torch

    from kompakt.model.device import use_device
    from kompakt.recipe.runner import run_recipe
    from kompakt.recipe.schema import Recipe

    torch.set_num_threads(threads)
    calibration = data / "wiki.valid.tokens"
    text = out.parent / "calibration.txt"  # BENCH.md: wiki.valid.tokens with every " <unk>" removed
    text.write_text(calibration.read_text().replace(" <unk>", ""))
    recipe = Recipe.from_dict({
        "model": str(model), "seed": 0, "metrics": ["ppl"],
        "data": {"calibration": str(text), "evaluation": str(text), "calibration_blocks": calib_blocks,
                 "block_len": block_len},
        "steps": [{"quant.gptq": {"bits": 4, "group_size": 128, "symmetric": True, "batch_size": 4}}],
    })  # fmt: skip
    where = watch_peak()
    start = time.perf_counter()
    with use_device(device):
        result = run_recipe(recipe, out, force=True, max_memory=max_memory)
    seconds = time.perf_counter() - start
    gpu = {"peak_gpu_allocated": torch.cuda.max_memory_allocated(), "peak_gpu_reserved": torch.cuda.max_memory_reserved(),
           "gpu": torch.cuda.get_device_name()} if device.startswith("cuda") else {}  # fmt: skip
    record = result.records[0]
    final = result.final or out
    size = sum(p.stat().st_size for p in Path(final).resolve().glob("*.safetensors"))
    return {"seconds": seconds, "peak_rss": _peak_rss(), "streamed": bool(record["details"].get("streamed")),
            "output_bytes": size, "summary": record["summary"],
            "calibration_seconds": record["details"].get("calibration_seconds"), "peak_at": where["at"], "device": device,
            **gpu}  # fmt: skip


def export_gguf(model: Path, out: Path, type: str, max_memory: str, threads: int) -> dict:
    """The model as GGUF `type`, written tensor by tensor (`kompakt export MODEL --format gguf --type q4_0`)."""
    import torch

    import kompakt

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = kompakt.export(str(model), format="gguf", type=type, out=out, force=True, max_memory=max_memory)
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "type": result.type,
            "output_bytes": result.size_bytes, "checked": result.check is not None, "notes": result.notes}  # fmt: skip


def convert_back(gguf: Path, cache: Path, threads: int) -> dict:
    """kompakt reading the exported GGUF (`kompakt eval FILE ...` converts it first): the file
    converted tensor by tensor into an fp32 directory under `cache`, its peak RSS and time."""
    import os

    import torch

    os.environ["KOMPAKT_CACHE"] = str(cache)
    from kompakt.model.gguf_convert import convert_gguf

    torch.set_num_threads(threads)
    start = time.perf_counter()
    directory = convert_gguf(gguf)
    size = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "output_bytes": size,
            "shards": len(list(directory.glob("*.safetensors")))}  # fmt: skip


def llama_quantize(source: Path, out: Path, type: str, threads: int) -> dict:
    """llama.cpp's own quantizer (llama-quantize's `llama_model_quantize`, through llama-cpp-python) on
    the F16 GGUF of the same model, to `type`: its peak RSS and time beside kompakt's streamed export.
    Its defaults, as `llama-quantize F16.gguf OUT.gguf Q4_0` runs (the output tensor in Q6_K)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}")
    params.nthread = threads
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code}")
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "output_bytes": out.stat().st_size}


def peer_gptq(model: Path, work: Path, python: str, calib_blocks: int, block_len: int, threads: int,
              data: Path = DATA) -> dict:  # fmt: skip
    """llm-compressor's `oneshot` GPTQ W4 g128 on the same model, in its own environment
    (bench/peers/llmcompressor_run.py): loaded as its examples load a model (`torch_dtype="auto"`,
    here bf16), `calib_blocks` x `block_len` tokens sampled from the same text as kompakt's run
    (BENCH.md's sampling, seed 0). Its peak RSS is its own process's VmHWM, taken before anything
    is saved (nothing is)."""
    from quant import calibration_blocks
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    blocks = calibration_blocks(AutoTokenizer.from_pretrained(model), calib_blocks, block_len, data)
    path = work / "peer-blocks.safetensors"
    save_file({"input_ids": blocks.contiguous()}, str(path))
    script = REPO / "bench" / "peers" / "llmcompressor_run.py"
    done = subprocess.run([python, str(script), "--model", str(model), "--blocks", str(path), "--method", "gptq-w4g128",
                           "--threads", str(threads), "--dtype", "auto", "--no-save", "--out", str(work / "peer-out")],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"llm-compressor failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_generate(gguf: Path, threads: int) -> dict:
    """The GGUF loaded in llama.cpp (llama-cpp-python) and 16 tokens generated: it runs, nothing more
    (random weights)."""
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=threads, verbose=False)
    out = llm.create_completion("The", max_tokens=16, temperature=0.0)
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(),
            "tokens": out["usage"]["completion_tokens"]}  # fmt: skip


def perplexity(model: Path, tokens: int, max_memory: str, threads: int, data: Path = DATA) -> dict:
    """Perplexity of `model` over `tokens` tokens of WikiText-2 test, windows of 512, layer by layer
    (`kompakt eval MODEL --data ... --max-memory` does this for a model larger than the budget; the
    2-layer cut of a preset fits 3 GB whole, so the streamed path is taken here on purpose)."""
    import torch

    from kompakt.evaluate.api import evaluate, is_streamed
    from kompakt.model.lazy import open_lazy

    torch.set_num_threads(threads)
    text = data / "wiki.test.raw"
    start = time.perf_counter()
    candidate = open_lazy(model).loaded()  # packed (compressed-tensors): dequantized layer by layer
    result = evaluate(candidate, data=text, window=512, max_tokens=tokens, speed=False)
    return {"seconds": time.perf_counter() - start, "peak_rss": _peak_rss(), "streamed": is_streamed(candidate),
            "tokens_scored": result.tokens_scored, "ppl": result.ppl}  # fmt: skip


def _child(args: list[str], required: bool = True) -> dict:
    """Run one phase in a fresh process (its own VmHWM); its JSON is the last stdout line. A phase
    after GPTQ that fails (`required` False) is recorded with its error, not fatal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        if not required:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                    "peak_rss": 0, "seconds": 0.0}  # fmt: skip
        raise SystemExit(f"phase {args[1]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers of the preset's shape")
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=512)
    parser.add_argument("--max-memory", default="3GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where GPTQ computes: cpu, or cuda (layers onloaded one at a time)")
    parser.add_argument("--data", type=Path, default=DATA, help="the WikiText-2 folder (wiki.valid.tokens, wiki.test.raw)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kompakt-stream-big"), help="where the model is generated")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the run")
    parser.add_argument("--export", default="q4_0", help="GGUF type of the streamed export of the model ('none': skip)")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="perplexity of the GPTQ result over this many "
                        "WikiText-2 test tokens, streamed (0: skip)")  # fmt: skip
    parser.add_argument("--peer-quantizer", action="store_true", help="also llama.cpp's quantizer on the model's F16 GGUF "
                        "(exported streamed first) to the --export type, side by side with kompakt's streamed export")  # fmt: skip
    parser.add_argument("--peer", help="python of the llm-compressor environment (bench/peers/): its oneshot GPTQ "
                        "W4 g128 on the same model, side by side (time and peak RSS)")  # fmt: skip
    parser.add_argument("--convert-back", action="store_true", help="also kompakt reading the exported GGUF: "
                        "converted tensor by tensor to an fp32 directory (4 bytes per parameter of disk)")  # fmt: skip
    parser.add_argument("--phase", choices=["generate", "quantize", "export", "llama", "llama-quantize", "ppl", "convert"],
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    model, out = args.work / "model", args.work / "run"
    if args.phase == "generate":
        print(json.dumps(generate(model, shape)))
        return
    if args.phase == "quantize":
        print(json.dumps(quantize(model, out, args.calib_blocks, args.block_len, args.max_memory, args.threads,
                                  args.device, args.data)))  # fmt: skip
        return
    gguf = args.work / f"model-{args.export}.gguf"
    if args.phase == "export":
        print(json.dumps(export_gguf(model, gguf, args.export, args.max_memory, args.threads)))
        return
    if args.phase == "llama":
        print(json.dumps(llama_generate(gguf, args.threads)))
        return
    if args.phase == "convert":
        print(json.dumps(convert_back(gguf, args.work / "cache", args.threads)))
        return
    if args.phase == "llama-quantize":
        print(json.dumps(llama_quantize(args.work / "model-f16.gguf", args.work / f"model-{args.export}-llama.gguf",
                                        args.export, args.threads)))  # fmt: skip
        return
    if args.phase == "ppl":
        print(json.dumps(perplexity(out / "final", args.ppl_tokens, args.max_memory, args.threads, args.data)))
        return
    common = ["--preset", args.preset, "--work", str(args.work)] + (["--layers", str(args.layers)] if args.layers else [])
    made = _child(["--phase", "generate", *common])
    ran = _child(["--phase", "quantize", *common, "--calib-blocks", str(args.calib_blocks),
                  "--block-len", str(args.block_len), "--max-memory", args.max_memory,
                  "--threads", str(args.threads), "--device", args.device, "--data", str(args.data)])  # fmt: skip
    phases = {"generate": made, "gptq_w4_g128": ran}
    if args.peer:  # the peer's process is a child of this one: its VmHWM is its own
        phases["llmcompressor_gptq_w4_g128"] = peer_gptq(model, args.work, args.peer, args.calib_blocks, args.block_len,
                                                         args.threads, args.data)  # fmt: skip
    if args.export != "none":
        phases[f"export_{args.export}"] = _child(["--phase", "export", *common, "--export", args.export,
                                                  "--max-memory", args.max_memory, "--threads", str(args.threads)], required=False)  # fmt: skip
        phases["llama_cpp_generate"] = _child(["--phase", "llama", *common, "--export", args.export,
                                               "--threads", str(args.threads)], required=False)  # fmt: skip
    if args.export != "none" and args.convert_back:
        phases[f"convert_{args.export}_back"] = _child(["--phase", "convert", *common, "--export", args.export,
                                                        "--threads", str(args.threads)], required=False)  # fmt: skip
    if args.export != "none" and args.peer_quantizer:  # the F16 GGUF (streamed, kompakt), then llama.cpp's quantizer on it
        phases["export_f16"] = _child(["--phase", "export", *common, "--export", "f16", "--max-memory", args.max_memory,
                                       "--threads", str(args.threads)], required=False)  # fmt: skip
        phases[f"llama_cpp_quantize_{args.export}"] = _child(["--phase", "llama-quantize", *common, "--export", args.export,
                                                              "--threads", str(args.threads)], required=False)  # fmt: skip
    if args.ppl_tokens:
        phases["perplexity"] = _child(["--phase", "ppl", *common, "--ppl-tokens", str(args.ppl_tokens),
                                       "--max-memory", args.max_memory, "--threads", str(args.threads),
                                       "--data", str(args.data)], required=False)  # fmt: skip
    name = f"stream_big-{args.preset}" + (f"-{args.layers}L" if args.layers else "") + (
        f"-{args.device.split(':')[0]}" if args.device != "cpu" else "") + ("-peer" if args.peer else "")
    result = {
        "preset": args.preset, "shape": shape, "calibration": f"{args.calib_blocks} x {args.block_len} tokens",
        "max_memory": args.max_memory, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), **phases,
        "command": "python bench/stream_big.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    print(f"{'phase':<22} {'peak RSS':>10} {'wall':>9}  size")
    print(f"{'generate (bf16)':<22} {made['peak_rss'] / gb:>8.2f} GB {made['seconds']:>7.1f} s  {made['bytes'] / gb:.2f} GB")
    print(f"{'GPTQ W4 g128 streamed':<22} {ran['peak_rss'] / gb:>8.2f} GB {ran['seconds']:>7.1f} s  "
          f"{ran['output_bytes'] / gb:.2f} GB  (streamed: {ran['streamed']})")  # fmt: skip
    if args.peer:
        peer = phases["llmcompressor_gptq_w4_g128"]
        print(f"{'llm-compressor GPTQ':<22} {peer['peak_rss'] / gb:>8.2f} GB {peer['seconds']:>7.1f} s  "
              f"(loaded in {peer['dtype']}, whole model in RAM)")  # fmt: skip
    if "peak_gpu_allocated" in ran:
        print(f"{'  on ' + ran['gpu']:<22} {ran['peak_gpu_allocated'] / gb:>8.2f} GB GPU memory at peak (allocated)")
    for key, label in ((f"export_{args.export}", f"GGUF {args.export} export"), ("llama_cpp_generate", "llama.cpp generate"),
                       (f"convert_{args.export}_back", f"{args.export} GGUF read back"), ("export_f16", "GGUF f16 export"), (f"llama_cpp_quantize_{args.export}", f"llama.cpp -> {args.export}"),
                       ("perplexity", "perplexity (GPTQ)")):  # fmt: skip
        if key in phases:
            got = phases[key]
            if "error" in got:
                print(f"{label:<22} failed: {got['error']}")
                continue
            extra = got.get("output_bytes", got.get("tokens_scored", got.get("tokens", "")))
            print(f"{label:<22} {got['peak_rss'] / gb:>8.2f} GB {got['seconds']:>7.1f} s  {extra}")
    if not args.keep:
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
