"""GGUF at the same type and size (issue 4): kompakt's Q4_0 vs llama.cpp's own Q4_0 quantizer.

- kompakt Q4_0: the AWQ + GPTQ model on the q4_0 grid (bench/quant.py saves it), exported with
  kompakt's GGUF writer, whose blocks are written exactly as quantized (no re-rounding).
- llama.cpp Q4_0: llama-cpp-python's `llama_model_quantize` (round to nearest, no imatrix) on
  an F16 GGUF that kompakt exported from the original.

Both files are read back with `kompakt.load` (GGUF -> dequantized HF model) and scored by the
same evaluator against the original: perplexity, mean KL, top-1 on the first 16384 tokens of
WikiText-2 test (the BENCH.md anchors: llama.cpp Q4_0 35.27, KL 0.307, top-1 69.5 %, 91.7 MB).
Plus llama.cpp generation tokens/s of the Q4_0 and the F16 file: same prompt, same threads,
same run, greedy, batch 1.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)
PROMPT = "The history of the city begins in the early middle ages, when"


def llamacpp_quantize(source: Path, target: Path, threads: int) -> float:
    """llama.cpp's own quantizer: F16 GGUF -> Q4_0 GGUF; returns its wall seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
    return time.perf_counter() - start


def generation_speed(path: Path, threads: int, tokens: int = 128) -> float:
    """Greedy generation tokens/s in llama.cpp after PROMPT (prompt time excluded, one warm-up)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False, seed=0)  # fmt: skip
    try:
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
        best = 0.0
        for _ in range(2):  # the first round warms caches; keep the faster
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(tokens):
                token = llm.sample(temp=0.0)
                llm.eval([token])
            best = max(best, tokens / (time.perf_counter() - start))
        return best
    finally:
        llm.close()


def compare(original, kept_dir: Path, ids, work: Path, *, tokens: int = 16384, threads: int = 1) -> list[dict]:
    """Rows: original (16k), kompakt Q4_0, llama.cpp Q4_0 (+ F16 speed)."""
    from kompakt.evaluate import fidelity
    from kompakt.export.gguf import write_gguf
    from kompakt.model.load import load

    work.mkdir(parents=True, exist_ok=True)
    ours_model = load(kept_dir)
    ours = write_gguf(ours_model, work / "kompakt-q4_0.gguf", type="q4_0", force=True)
    del ours_model
    f16 = write_gguf(original, work / "original-f16.gguf", type="f16", force=True)
    theirs_path = work / "llamacpp-q4_0.gguf"
    quantize_s = llamacpp_quantize(f16.path, theirs_path, threads)
    speeds = {name: generation_speed(path, threads) for name, path in
              (("f16", f16.path), ("kompakt q4_0", ours.path), ("llama.cpp q4_0", theirs_path))}  # fmt: skip
    rows = []
    for label, path, extra in (
        ("GGUF kompakt Q4_0 (AWQ+GPTQ on the q4_0 grid)", ours.path,
         {"exact_grid_tensors": ours.exact_grid_tensors, "requantized_blocks": ours.requantized_blocks,
          "gen_tps": speeds["kompakt q4_0"]}),
        ("GGUF llama.cpp Q4_0 (llama_model_quantize from F16)", theirs_path,
         {"quantize_seconds": quantize_s, "gen_tps": speeds["llama.cpp q4_0"]}),
    ):  # fmt: skip
        candidate = load(path)
        fid = fidelity(original, candidate, ids, window=512, stride=512, max_tokens=tokens)
        rows.append({"name": label, "ppl": fid.ppl_candidate, "kl": fid.kl_mean, "kl_p99": fid.kl_p99,
                     "top1": fid.top1, "file_bytes": path.stat().st_size, "tokens": tokens,
                     "ppl_original": fid.ppl_reference, **extra})  # fmt: skip
        del candidate
    rows.append({"name": "GGUF F16 (original)", "ppl": rows[0]["ppl_original"], "kl": 0.0, "top1": 1.0,
                 "file_bytes": f16.path.stat().st_size, "tokens": tokens, "gen_tps": speeds["f16"]})  # fmt: skip
    return rows
