"""Serving speed (issue 6): the embedded model over the OpenAI API, transformers vs llama.cpp.

Each engine is served in-process on 127.0.0.1 (uvicorn in a thread, same code as `kompakt
serve`) and driven by streaming chat requests over HTTP, so the numbers include the server.
Rows: the original model on transformers (fp32, the reference), a 4-bit GGUF of it written by
kompakt's own GGUF export (q4_0) on llama.cpp, and the embedded Q4_1 GGUF on llama.cpp.
For 1 and 4 concurrent clients: time to first token (TTFT, includes waiting in the queue:
the server generates one request at a time) and generation tokens/s (all tokens of all
clients / wall time of the round, prefill excluded per request for 1 client). Ratios are to
the transformers fp32 row at the same concurrency, measured in the same run.

    .venv/bin/python bench/serve.py [--tokens 32] [--requests 2] [--threads 2]

Prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "serve"))
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def stream_once(base: str, max_tokens: int, seed: int) -> dict:
    """One streaming chat request: TTFT, tokens, seconds from first token to the end."""
    import httpx

    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - start, "tokens": tokens, "gen_s": end - first, "total_s": end - start}


def run_round(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for repeat in range(requests):
            result = stream_once(base, max_tokens, seed=index * 100 + repeat)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(result["tokens"] for result in results)
    if clients == 1:  # decode speed proper: prefill excluded
        tok_s = tokens / max(1e-9, sum(result["gen_s"] for result in results))
    else:  # aggregate throughput of the server
        tok_s = tokens / wall
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "ttft_s": statistics.mean(result["ttft_s"] for result in results),
        "tok_s": tok_s,
        "wall_s": wall,
    }


def engines(threads: int, workdir: Path) -> list[tuple[str, object]]:
    """(label, backend factory) for every row; the first is the reference."""
    from kompakt.model.embedded import embedded_gguf
    from kompakt.model.load import load
    from kompakt.serve.backend_choice import llama_cpp_available
    from kompakt.serve.backend_transformers import TransformersBackend

    rows: list[tuple[str, object]] = [
        ("transformers fp32 (original)", lambda: TransformersBackend(load("smollm2-135m", dtype=torch.float32)))
    ]
    if not llama_cpp_available():
        print("llama-cpp-python is not installed: llama.cpp rows skipped", file=sys.stderr)
        return rows
    from kompakt.serve.backend_llamacpp import LlamaCppBackend

    def kompakt_q4() -> object:
        from kompakt.export.gguf import export_gguf

        path = export_gguf(
            load("smollm2-135m", dtype=torch.float32), workdir / "smollm2-135m-q4_0.gguf", type="q4_0", force=True
        )
        return LlamaCppBackend(path, n_ctx=2048, n_threads=threads)

    rows.append(("llama.cpp q4_0 (kompakt export)", kompakt_q4))
    rows.append(
        (
            "llama.cpp Q4_1 (embedded GGUF)",
            lambda: LlamaCppBackend(embedded_gguf("smollm2-135m"), n_ctx=2048, n_threads=threads),
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per engine")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from test_server_support import running_server

    table: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, factory in engines(args.threads, Path(workdir)):
            backend = factory()
            with running_server(backend, max_tokens_cap=args.tokens, queue_size=16) as base:
                stream_once(base, 4, seed=0)  # warm-up
                for clients in (1, 4):
                    requests = args.requests if clients == 1 else 1
                    row = {"engine": label, **run_round(base, clients, requests, args.tokens)}
                    table.append(row)
                    print(
                        f"{label:34s} clients={clients} tok/s={row['tok_s']:.1f} ttft={row['ttft_s']:.3f}s",
                        file=sys.stderr,
                    )
            backend.close()
            torch.set_num_threads(args.threads)
    reference = {row["clients"]: row for row in table if row["engine"] == table[0]["engine"]}
    for row in table:
        ref = reference[row["clients"]]
        row["tok_s_ratio"] = row["tok_s"] / ref["tok_s"]
        row["ttft_ratio"] = row["ttft_s"] / ref["ttft_s"]
    print(f"\n{'engine':34s} {'clients':>7s} {'tok/s':>8s} {'x ref':>6s} {'TTFT s':>8s} {'x ref':>6s}")
    for row in table:
        print(f"{row['engine']:34s} {row['clients']:7d} {row['tok_s']:8.1f} {row['tok_s_ratio']:6.2f} "
              f"{row['ttft_s']:8.3f} {row['ttft_ratio']:6.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "max_tokens": args.tokens,
        "requests_per_client_at_1": args.requests,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
