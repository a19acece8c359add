"""Prompt (prefill) and generation speed in tokens per second, with threads and backend stated.

Protocol (BENCH.md): forward tokens/s on prompt_batch x prompt_len batches; greedy generation
tokens/s at batch 1 after a gen_prompt_len-token prompt. One warm-up of each first. Absolute
numbers depend on the machine: compare them as ratios measured in the same run.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig

from kompakt.errors import ConfigError
from kompakt.evaluate.perplexity import unwrap_model

logger = logging.getLogger(__name__)


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    generate_tokens_per_s: float
    threads: int
    backend: str
    device: str
    dtype: str = ""
    prompt_batch: int = 4
    prompt_len: int = 256
    gen_prompt_len: int = 16
    gen_tokens: int = 64
    repeats: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Use `threads` intra-op threads inside the block (restored after); yields the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_ids(vocab: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    # Fixed seed: the same tokens for every model measured in a run.
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, shape, generator=generator).to(device)


def _time_prefill(net, inputs: torch.Tensor, repeats: int) -> float:
    device = inputs.device
    with torch.inference_mode():
        net(input_ids=inputs, use_cache=False)  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            net(input_ids=inputs, use_cache=False)
        _synchronize(device)
    return inputs.numel() * repeats / (time.perf_counter() - start)


def _time_generate(net, prompt: torch.Tensor, new_tokens: int, repeats: int, eos: int | None) -> float:
    def config(n: int) -> GenerationConfig:
        # min_new_tokens == max_new_tokens: never stop early at EOS, so every run makes n tokens.
        return GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )

    mask = torch.ones_like(prompt)
    with torch.inference_mode():
        net.generate(input_ids=prompt, attention_mask=mask, generation_config=config(min(8, new_tokens)))
        _synchronize(prompt.device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = net.generate(input_ids=prompt, attention_mask=mask, generation_config=config(new_tokens))
        _synchronize(prompt.device)
    made = out.shape[1] - prompt.shape[1]
    return made * repeats / (time.perf_counter() - start)


def measure_speed(
    loaded,
    *,
    threads: int | None = None,
    prompt_batch: int = 4,
    prompt_len: int = 256,
    gen_prompt_len: int = 16,
    gen_tokens: int = 64,
    repeats: int = 2,
) -> SpeedResult:
    """Prefill and greedy-generation tokens/s of a LoadedModel (or transformers model)."""
    net = unwrap_model(loaded)
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    vocab = net.get_output_embeddings().weight.shape[0]
    eos = getattr(getattr(loaded, "tokenizer", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(net.generation_config, "eos_token_id", None) or getattr(net.config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]
    with torch_threads(threads) as used:
        prefill = _time_prefill(net, _random_ids(vocab, (prompt_batch, prompt_len), device), repeats)
        generate = _time_generate(net, _random_ids(vocab, (1, gen_prompt_len), device), gen_tokens, repeats, eos)
    result = SpeedResult(
        prefill_tokens_per_s=prefill,
        generate_tokens_per_s=generate,
        threads=used,
        backend=f"torch {torch.__version__.split('+')[0]} {device.type}",
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        prompt_batch=prompt_batch,
        prompt_len=prompt_len,
        gen_prompt_len=gen_prompt_len,
        gen_tokens=gen_tokens,
        repeats=repeats,
    )
    logger.info("speed: prefill %.1f tok/s, generate %.1f tok/s", prefill, generate)
    return result
