"""Calibration text written by the model itself, for when the user gives no data.

Why self-generated: Ji et al. 2024 ("Beware of Calibration Data for Pruning Large Language
Models") find text sampled from the model itself calibrates pruning as well as or better
than a generic corpus, and LLM-QAT (Liu et al. 2023) uses the same idea for data-free
quantization-aware training. Sampled text follows the model's own distribution, so the
activations seen during calibration are the ones the model produces in use.

How it is sampled (the choice, and why):
- Plain ancestral sampling at temperature 1 (no top-k / top-p, no repetition penalty, the
  model's own generation defaults ignored): the sample then *is* the model's distribution;
  truncation would make calibration text blander than real use.
- Chat models (a tokenizer with a chat template) start from the template with a user
  request drawn from a few hundred varied requests (kinds of writing x topics), and answer
  it; the calibration text then includes the template tokens the model sees when it chats.
- Base models start from BOS alone (their unconditional distribution), or, without a BOS
  token, from a short generic opening.
- Sequences stop at an end-of-sequence token or after `max_new_tokens`; batches are added
  until `n_tokens` tokens (as `tokenize_texts` counts them) are reached.

Deterministic: batch b is sampled with torch seed `seed * 1_000_003 + b` inside a forked RNG
(the caller's random state is untouched), its prompts drawn from `random.Random` with the
same seed. A larger request therefore extends a smaller one batch by batch, and a cached
larger file serves a smaller request.

Cached as JSON lines (never pickle) under `cache_dir()/data/`, keyed by the model
fingerprint, the sampling options, the seed and the size; written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from kompakt.atomic import write_text
from kompakt.errors import ConfigError

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1  # bump when prompts or sampling change: old cache files stop matching
_SEED_STRIDE = 1_000_003

_KINDS = (
    "Write a short story about {}.",
    "Explain {} to a curious teenager.",
    "Write a detailed encyclopedia-style article about {}.",
    "List five surprising facts about {}, with a sentence on each.",
    "Write a friendly email to a colleague about {}.",
    "Give step-by-step instructions related to {}.",
    "Write a short poem about {}.",
    "What are the pros and cons of {}? Answer in a few paragraphs.",
    "Write a dialogue between two people discussing {}.",
    "Summarize the history of {}.",
    "Write a Python function related to {} and explain how it works.",
    "Answer as an expert: what is most often misunderstood about {}?",
    "Write a news report about a recent development in {}.",
    "Describe {} in simple words, then in technical terms.",
    "Write a product review that mentions {}.",
    "Pose a math word problem about {} and solve it step by step.",
)
_TOPICS = (
    "the ocean", "volcanoes", "the Roman Empire", "machine learning", "cooking pasta",
    "climate change", "the human immune system", "chess", "black holes", "a small bakery",
    "learning a new language", "medieval castles", "electric cars", "photosynthesis",
    "the stock market", "jazz music", "honeybees", "ancient Egypt", "quantum computing",
    "running a marathon", "the French Revolution", "gardening", "sleep", "the internet",
    "mountain climbing", "vaccines", "renewable energy", "a lost cat", "friendship",
    "space travel", "coffee", "prime numbers", "the printing press", "rainforests",
    "public libraries", "earthquakes", "time management", "the Moon", "bridges",
    "a birthday party",
)
_OPENINGS = ("The", "In", "A", "When", "It", "This", "One", "There", "We", "After", "#", "1.")


def _cache_root() -> Path:
    from kompakt.model.cache import cache_dir

    return cache_dir() / "data"


def generate_texts(
    loaded: Any,
    n_tokens: int,
    seed: int = 0,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> list[str]:
    """At least `n_tokens` tokens of text sampled from `loaded` (a LoadedModel), cached on disk.

    Args:
        loaded: the model to sample from (its tokenizer counts the tokens).
        n_tokens: how many tokens the texts hold together (whole batches, so a little more).
        seed: sampling seed; the same seed gives the same texts.
        batch_size: sequences sampled at once.
        max_new_tokens: longest sampled continuation per sequence.
        temperature: sampling temperature (1 = the model's distribution).
        cache: read and write the on-disk cache.
        cache_dir: cache directory; default `kompakt.model.cache.cache_dir() / "data"`.

    Returns:
        The sampled documents (prompt included, special tokens as text).
    """
    if n_tokens < 1 or batch_size < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ConfigError(
            f"generated data needs positive n_tokens, batch_size, max_new_tokens and temperature; "
            f"got {n_tokens}, {batch_size}, {max_new_tokens}, {temperature}"
        )
    options = dict(v=_FORMAT_VERSION, batch=batch_size, new=max_new_tokens, temp=temperature)
    stem = f"{loaded.fingerprint()}-{_short_hash(options)}-seed{seed}"
    directory = Path(cache_dir) if cache_dir is not None else (_cache_root() if cache else None)
    if cache and directory is not None:
        cached = _read_cached(directory, stem, n_tokens)
        if cached is not None:
            logger.info("using cached generated data %s (%d documents)", directory / stem, len(cached))
            return cached
    rows = _sample(loaded, n_tokens, seed, batch_size, max_new_tokens, temperature)
    if cache and directory is not None:
        _write_atomic(directory / f"{stem}-{n_tokens}.jsonl", rows)
    return [row["text"] for row in rows]


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def _read_cached(directory: Path, stem: str, n_tokens: int) -> list[str] | None:
    """Texts from the smallest cached file of at least `n_tokens` (whole batches), else None."""
    if not directory.is_dir():
        return None
    pattern = re.compile(re.escape(stem) + r"-(\d+)\.jsonl")
    matches = (pattern.fullmatch(p.name) for p in directory.glob(f"{stem}-*.jsonl"))
    sizes = sorted(int(m.group(1)) for m in matches if m)
    for size in (s for s in sizes if s >= n_tokens):
        path = directory / f"{stem}-{size}.jsonl"
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            texts, total, last_batch = [], 0, None
            for row in rows:
                if row["batch"] != last_batch and total >= n_tokens:
                    break  # whole batches only: the same texts a fresh run would sample
                texts.append(row["text"])
                total += int(row["n_tokens"])
                last_batch = row["batch"]
            if total >= n_tokens:
                return texts
            logger.warning("ignoring short cache file %s", path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
    return None


def _write_atomic(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _sample(loaded: Any, n_tokens: int, seed: int, batch_size: int, max_new_tokens: int,
            temperature: float) -> list[dict]:
    from rich.progress import Progress

    tokenizer = loaded.tokenizer
    rows: list[dict] = []
    total = 0
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"generating calibration text with {loaded.name}", total=n_tokens)
        batch = 0
        while total < n_tokens:
            prompts = _prompts(tokenizer, batch_size, random.Random(seed * _SEED_STRIDE + batch))
            for ids in _generate_batch(loaded, prompts, seed * _SEED_STRIDE + batch, max_new_tokens, temperature):
                text = tokenizer.decode(ids, skip_special_tokens=False)
                count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                rows.append({"batch": batch, "n_tokens": count, "text": text})
                total += count
            progress.update(task, completed=min(total, n_tokens))
            batch += 1
    logger.info("generated %d tokens in %d documents with %s", total, len(rows), loaded.name)
    return rows


def _prompts(tokenizer: Any, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Token ids of the starts of one batch."""
    prompts = []
    for _ in range(batch_size):
        if getattr(tokenizer, "chat_template", None):
            request = rng.choice(_KINDS).format(rng.choice(_TOPICS))
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
            )
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif tokenizer.bos_token_id is not None:
            prompts.append([tokenizer.bos_token_id])
        else:
            prompts.append(tokenizer(rng.choice(_OPENINGS), add_special_tokens=False)["input_ids"])
    return prompts


def _stop_ids(loaded: Any) -> set[int]:
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _generate_batch(loaded: Any, prompts: list[list[int]], seed: int, max_new_tokens: int,
                    temperature: float) -> list[list[int]]:
    """Sample continuations of left-padded prompts; each result is prompt + kept new tokens."""
    from transformers import GenerationConfig

    stop = _stop_ids(loaded)
    pad = loaded.tokenizer.pad_token_id
    pad = pad if pad is not None else (min(stop) if stop else 0)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at column `width`
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    new_tokens = min(max_new_tokens, loaded.context_length - width)
    if new_tokens < 1:
        raise ConfigError(f"the model's context ({loaded.context_length}) is too short to generate data")
    # Every sampling knob set explicitly: transformers fills unset (None) fields from the
    # model's own generation_config, which may truncate or penalise (top_p, repetition_penalty).
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=sorted(stop) or None,
    )
    device = loaded.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        output = loaded.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
        )
    results = []
    for row, prompt in enumerate(prompts):
        new = output[row, width:].tolist()
        end = next((i + 1 for i, token in enumerate(new) if token in stop), len(new))
        results.append(list(prompt) + new[:end])
    return results
