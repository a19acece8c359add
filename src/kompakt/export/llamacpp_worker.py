"""Run a GGUF file in llama.cpp and print what it predicts (the export check's llama.cpp side).

Started as a script (`python -P llamacpp_worker.py`, a JSON request on stdin, one JSON line on
stdout) by kompakt.export.check_runtimes, never imported: llama.cpp can crash the process on a
bad file or a CPU kernel bug, and a crash must become a one-line error, not kill kompakt. It
imports only llama_cpp and numpy, so it starts in a fraction of a second.

Request: path, sequences (token ids to score), prompt (ids), new_tokens, texts (to tokenize),
n_ctx, threads, no_repack (run without llama.cpp's extra CPU buffer types: AMX / repacked
weights, what `llama-server --no-repack` does). Answer: top1 (argmax per position of each
sequence), greedy (ids), sample (text), tokens (per text), version; or error.

With `"embed": true` the file is a sentence encoder (kompakt.export.check_embed): it is loaded
with embedding=True and its own pooling, and the answer is embeddings (one pooled, unnormalised
vector per text), tokens (per text), version.
"""

from __future__ import annotations

import json
import sys
import time


def _disable_extra_buffers(module) -> None:
    """Load the next model without AMX / repacked weight buffers (llama.cpp issue #20824: the AMX
    matmul segfaults on some machines that report AMX)."""
    default = module.llama_model_default_params

    def params():
        values = default()
        if hasattr(values, "use_extra_bufts"):
            values.use_extra_bufts = False
        return values

    module.llama_model_default_params = params


def _greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    produced: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced.append(token)
        llm.eval([token])
    return produced


def _sample_text(llm, tokens: list[int]) -> str:
    import llama_cpp

    kept = []
    for token in tokens:
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        kept.append(token)
    return llm.detokenize(kept).decode("utf-8", errors="replace")


def embed(request: dict) -> dict:
    import llama_cpp

    started = time.perf_counter()
    n_ctx = request["n_ctx"]  # an encoder sees a whole sequence in one micro-batch
    llm = llama_cpp.Llama(model_path=request["path"], embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          verbose=False, n_threads=request["threads"])  # fmt: skip
    try:
        embeddings = [llm.embed(text, normalize=False, truncate=False) for text in request["texts"]]
        tokens = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request["texts"]]
    finally:
        llm.close()
    return {"embeddings": embeddings, "tokens": tokens, "version": llama_cpp.__version__,
            "seconds": time.perf_counter() - started}  # fmt: skip


def run(request: dict) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low
    import numpy as np

    if request.get("no_repack"):
        _disable_extra_buffers(low)
    if request.get("embed"):
        return embed(request)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=request["path"], n_ctx=request["n_ctx"], logits_all=True, verbose=False,
                          n_threads=request["threads"], seed=0)  # fmt: skip
    try:
        top1 = []
        for ids in request["sequences"]:
            llm.reset()
            llm.eval(ids)
            top1.append(np.asarray(llm.scores[: len(ids)]).argmax(-1).tolist())
        greedy = _greedy(llm, request["prompt"], request["new_tokens"])
        tokens = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request["texts"]]
        sample = _sample_text(llm, greedy)
    finally:
        llm.close()
    return {"top1": top1, "greedy": greedy, "sample": sample, "tokens": tokens, "version": llama_cpp.__version__,
            "seconds": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        answer = run(request)
    except Exception as error:  # noqa: BLE001 - whatever llama.cpp raises is the check's answer
        answer = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
