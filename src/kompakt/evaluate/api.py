"""`evaluate`: quality, fidelity, size, memory and speed of a model in one call."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kompakt.errors import ConfigError
from kompakt.evaluate.encoder_api import EncoderEvalResult, evaluate_encoder, is_encoder_pair
from kompakt.evaluate.fidelity import FidelityResult, fidelity
from kompakt.evaluate.fidelity_mapped import fidelity_across
from kompakt.evaluate.memory import PeakMemory
from kompakt.evaluate.perplexity import PerplexityResult, perplexity
from kompakt.evaluate.size import disk_bytes, parameter_bytes, parameter_count
from kompakt.evaluate.speed import SpeedResult, measure_speed, torch_threads
from kompakt.evaluate.vocab_map import vocab_map
from kompakt.evaluate.windows import check_window
from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

# Tokens of self-generated text when neither ids nor max_tokens say how many (8 windows of 512).
DEFAULT_GENERATED_TOKENS = 4096
SELF_GENERATED = "self-generated"
EVAL_SEED = 1


@dataclass
class EvalResult:
    """Everything `evaluate` measured; `to_dict()` is JSON-ready and states the protocol."""

    model: str
    data: str
    window: int
    stride: int
    tokens_used: int
    tokens_scored: int
    ppl: float
    parameters: int
    parameter_bytes: int
    disk_bytes: int | None
    peak_rss_bytes: int
    threads: int
    wall_s: float
    reference: str | None = None
    ppl_reference: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    speed: SpeedResult | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["speed"] = self.speed.to_dict() if self.speed is not None else None
        return out


def _load_ids(data: str | Path | None, loaded: LoadedModel, n_tokens: int | None) -> torch.Tensor:
    # Imported here: data is a sibling package; evaluate must stay importable on its own.
    from kompakt.data import load_tokens

    if data is None:
        # Generated evaluation text uses its own seed so it is not the calibration text
        # (seed 0) that compression passes saw.
        return load_tokens(None, loaded, n_tokens=n_tokens or DEFAULT_GENERATED_TOKENS, seed=EVAL_SEED)
    return load_tokens(data, loaded, n_tokens=n_tokens)


def _quality(candidate, reference, ids, window, stride, max_tokens) -> tuple[PerplexityResult, FidelityResult | None]:
    if is_streamed(candidate) or (reference is not None and is_streamed(reference)):
        return _streamed_quality(candidate, reference, ids, window, stride, max_tokens)
    if reference is None:
        return perplexity(candidate, ids, window=window, stride=stride, max_tokens=max_tokens), None
    vmap = vocab_map(reference, candidate)  # a trimmed vocabulary (prune.vocab): its own rule
    if vmap is None:
        fid = fidelity(reference, candidate, ids, window=window, stride=stride, max_tokens=max_tokens)
    else:
        fid = fidelity_across(reference, candidate, ids, vmap, window=window, stride=stride, max_tokens=max_tokens)
    ppl = PerplexityResult(
        ppl=fid.ppl_candidate,
        nll_mean=math.log(fid.ppl_candidate),
        tokens_scored=fid.tokens,
        window=window,
        stride=stride,
        tokens_used=fid.tokens_used,
    )
    return ppl, fid


def open_within(source: str | Path | None, max_memory: int | str | None = None) -> LoadedModel:
    """`source` loaded whole (kompakt.load), or, when `max_memory` is given and its fp32 weights
    do not fit it, opened lazily (kompakt.model.lazy) so `evaluate` runs it layer by layer."""
    from kompakt.model.load import load

    if max_memory is None:
        return load(source)
    from kompakt.calib.memory_plan import PROCESS_BYTES
    from kompakt.export.gguf_stream import open_streamable
    from kompakt.units import parse_memory

    budget = parse_memory(max_memory)
    lazy = open_streamable(source, packed=True)  # a packed GPTQ result too: dequantized layer by layer
    if lazy is None or lazy.bytes_in(torch.float32) + PROCESS_BYTES <= budget:
        return load(source)
    logger.info("%s does not fit %d bytes: evaluated layer by layer", lazy.name, budget)
    return lazy.loaded()


def is_streamed(model: LoadedModel | None) -> bool:
    """Whether `model` was opened lazily (kompakt.model.lazy): evaluated layer by layer."""
    from kompakt.model.lazy import lazy_of

    return model is not None and lazy_of(model) is not None


def _streamed_quality(candidate, reference, ids, window, stride, max_tokens):
    """_quality for models opened lazily (kompakt.evaluate.streamed): the same numbers, one layer
    in memory at a time; the reference's log-probabilities in a temporary memory-mapped file."""
    import tempfile

    from kompakt.evaluate.streamed import streamed_fidelity, streamed_perplexity

    if reference is None:
        return streamed_perplexity(candidate, ids, window=window, stride=stride, max_tokens=max_tokens), None
    with tempfile.TemporaryDirectory(prefix="kompakt-eval-") as work:
        fid = streamed_fidelity(reference, candidate, ids, work_dir=work, window=window, stride=stride,
                                max_tokens=max_tokens)  # fmt: skip
    ppl = PerplexityResult(ppl=fid.ppl_candidate, nll_mean=math.log(fid.ppl_candidate), tokens_scored=fid.tokens,
                           window=window, stride=stride, tokens_used=fid.tokens_used)  # fmt: skip
    return ppl, fid


def evaluate(
    candidate: LoadedModel,
    reference: LoadedModel | None = None,
    ids: torch.Tensor | None = None,
    *,
    data: str | Path | None = None,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    speed: bool = True,
    threads: int | None = None,
    max_sentences: int | None = None,
) -> EvalResult | EncoderEvalResult:
    """Perplexity (and, with a reference, KL / top-1 / reference perplexity), size, peak RSS
    and speed of `candidate`.

    A sentence encoder (`candidate.is_encoder`) is measured by `evaluate_encoder` instead:
    embedding fidelity to the reference, sentences/s, size, peak RSS, on `data` read as
    sentences (the first `max_sentences`) or kompakt's held-out sentences; the token options
    (window, stride, max_tokens) do not apply to it.

    Text: `ids` when given; else `data` (a path, read by kompakt.data.load_tokens); else text
    generated by the reference (or the candidate) itself, stated as "self-generated".

    Raises:
        ConfigError: window longer than a model's context, stride > window, max_tokens < window;
            an encoder paired with a causal LM.
        DataError: fewer tokens than one window.
    """
    if is_encoder_pair(candidate, reference):
        if ids is not None:
            raise ConfigError("token ids are for causal LMs; evaluate an encoder on sentences (data=...)")
        return evaluate_encoder(candidate, reference, data=data, max_sentences=max_sentences, speed=speed, threads=threads)
    contexts = [m.context_length for m in (candidate, reference) if m is not None]
    stride = check_window(window, stride, min(contexts), max_tokens)
    if ids is None and data is None and any(is_streamed(m) for m in (candidate, reference)):
        raise ConfigError("a model larger than --max-memory cannot generate its own evaluation text; give --data")
    if ids is None:
        label = str(data) if data is not None else SELF_GENERATED
        ids = _load_ids(data, reference or candidate, max_tokens)
    else:
        label = str(data) if data is not None else "ids"
    start = time.perf_counter()
    with torch_threads(threads) as used, PeakMemory() as memory:
        ppl, fid = _quality(candidate, reference, ids, window, stride, max_tokens)
        timing = measure_speed(candidate) if speed and not is_streamed(candidate) else None
    result = EvalResult(
        model=candidate.name,
        data=label,
        window=window,
        stride=stride,
        tokens_used=ppl.tokens_used,
        tokens_scored=ppl.tokens_scored,
        ppl=ppl.ppl,
        parameters=parameter_count(candidate.model),
        parameter_bytes=parameter_bytes(candidate.model),
        disk_bytes=disk_bytes(candidate.path),
        peak_rss_bytes=memory.peak_bytes,
        threads=used,
        wall_s=time.perf_counter() - start,
        speed=timing,
    )
    if fid is not None:
        result.reference = reference.name
        result.ppl_reference = fid.ppl_reference
        result.kl_mean, result.kl_p99, result.top1 = fid.kl_mean, fid.kl_p99, fid.top1
        if fid.positions_removed or fid.removed_mass:
            result.extra.update(positions_removed=fid.positions_removed, removed_mass=fid.removed_mass)
    return result
