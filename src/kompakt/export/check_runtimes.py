"""The two runtimes an export is checked in, each answering the same question: the top-1 next
token at every position of some token sequences, a greedy continuation of a prompt, and how
the runtime's own tokenizer splits some texts.

- transformers: the directory loaded the way a user would, plain `AutoModelForCausalLM` /
  `AutoTokenizer.from_pretrained` (no kompakt code in between), on the CPU.
- llama.cpp: llama-cpp-python in a child process (kompakt/export/llamacpp_worker.py), so a
  crash is an answer rather than the end of kompakt. When llama.cpp crashes with its default
  CPU kernels, the file is run once more without its extra buffer types (AMX / repacked
  weights): the AMX matmul segfaults on some machines that report AMX (llama.cpp issue #20824),
  which says nothing about the file; the answer then carries a note saying so.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("llamacpp_worker.py")
WORKER_TIMEOUT_S = 300
_NO_REPACK_NOTE = (
    "llama.cpp crashed ({signal}) with its default CPU kernels on this machine and ran the file with "
    "its AMX / repacked kernels off (llama.cpp issue #20824); run llama.cpp here with --no-repack"
)


class RuntimeFailure(Exception):
    """The runtime could not load or run the file; the message says what it reported."""


@dataclass
class Answer:
    runtime: str
    top1: list[list[int]]
    greedy: list[int]
    sample: str
    tokens: list[list[int]]
    seconds: float
    notes: list[str] = field(default_factory=list)


def predict(model: torch.nn.Module, sequences: list[list[int]], prompt: list[int], new_tokens: int):
    """(top-1 per position of each sequence, greedy continuation of prompt) of a causal LM."""
    device = next(model.parameters()).device
    # transformers 5 renamed the KV-cache argument past_key_values to cache.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        top1 = [model(torch.tensor([ids], device=device)).logits[0].argmax(-1).tolist() for ids in sequences]
        step, cache, greedy = torch.tensor([prompt], device=device), None, []
        for _ in range(new_tokens):
            out = model(input_ids=step, use_cache=True, logits_to_keep=1, **({name: cache} if cache is not None else {}))
            cache = getattr(out, name)
            greedy.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[greedy[-1]]], device=device)
    return top1, greedy


def run_transformers(directory: Path, sequences, prompt, new_tokens: int, texts: list[str]) -> Answer:
    """Load `directory` with plain transformers on the CPU and answer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kompakt.model.progress import quiet_third_party

    started = time.perf_counter()
    try:
        with quiet_third_party():
            model = AutoModelForCausalLM.from_pretrained(directory, device_map=None).eval()
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001 - any failure to load is the check's answer
        raise RuntimeFailure(f"{type(error).__name__}: {one_line(str(error), 200)}") from None
    with quiet_third_party():  # compressed-tensors decompresses (with its bars) on the first forward
        top1, greedy = predict(model, sequences, prompt, new_tokens)
    eos = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
    cut = next((i for i, token in enumerate(greedy) if token in eos), len(greedy))
    return Answer(
        runtime=f"transformers {transformers.__version__}", top1=top1, greedy=greedy,
        sample=tokenizer.decode(greedy[:cut], skip_special_tokens=True),
        tokens=[tokenizer(text)["input_ids"] for text in texts], seconds=time.perf_counter() - started,
    )  # fmt: skip


def one_line(text: str, limit: int) -> str:
    """`text` with every run of whitespace (newlines too) as one space, cut to `limit` characters:
    a runtime's error becomes part of a one-line message."""
    return " ".join(str(text).split())[:limit]


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


_crashes_by_default = False  # set once default kernels crashed in this process: skip straight to --no-repack


def run_llamacpp(path: Path, sequences, prompt, new_tokens: int, texts: list[str]) -> Answer:
    """Run the GGUF at `path` in llama.cpp (a child process) and answer."""
    longest = max([len(ids) for ids in sequences] + [len(prompt) + new_tokens])
    request = {"path": str(path), "sequences": sequences, "prompt": prompt, "new_tokens": new_tokens,
               "texts": texts, "n_ctx": 64 * (longest // 64 + 1)}  # fmt: skip
    answer, notes = ask_llamacpp(request)
    return Answer(runtime=f"llama.cpp (llama-cpp-python {answer['version']})", top1=answer["top1"],
                  greedy=answer["greedy"], sample=answer["sample"], tokens=answer["tokens"],
                  seconds=answer["seconds"], notes=notes)  # fmt: skip


def ask_llamacpp(request: dict) -> tuple[dict, list[str]]:
    """(the worker's answer to `request`, notes): once with llama.cpp's default CPU kernels, again
    without its extra buffer types when those crash (module docstring).

    Raises:
        RuntimeFailure: llama.cpp crashed both ways, or answered with an error.
    """
    global _crashes_by_default
    request = {**request, "threads": min(4, os.cpu_count() or 1), "no_repack": _crashes_by_default}
    notes = []
    answer, crash = _run_worker(request)
    if crash and not request["no_repack"]:
        _crashes_by_default = True
        answer, again = _run_worker({**request, "no_repack": True})
        if again:
            raise RuntimeFailure(f"llama.cpp crashed ({again}) running the file, with and without --no-repack")
        notes.append(_NO_REPACK_NOTE.format(signal=crash))
    elif crash:
        raise RuntimeFailure(f"llama.cpp crashed ({crash}) running the file")
    if _crashes_by_default and not notes:
        notes.append(_NO_REPACK_NOTE.format(signal="earlier in this process"))
    if "error" in answer:
        raise RuntimeFailure(one_line(answer["error"], 300))
    return answer, notes


def _run_worker(request: dict) -> tuple[dict, str | None]:
    """(the worker's JSON answer, the signal name when it crashed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
    try:
        done = subprocess.run([sys.executable, "-P", str(WORKER)], input=json.dumps(request), capture_output=True,
                              text=True, timeout=WORKER_TIMEOUT_S, env=env, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"llama.cpp did not answer within {WORKER_TIMEOUT_S} s") from None
    if done.returncode < 0:
        return {}, signal.Signals(-done.returncode).name
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"the llama.cpp check failed: {one_line(tail, 300)}")
    return json.loads(lines[-1]), None
