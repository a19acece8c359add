"""`analyze`: phase 1 of shrinking a model — where the parameters are, what matters, what is fragile.

Stages (token counts are stated in `Analysis.settings`):
1. breakdown of parameters and bytes (no data);
2. one calibration pass over `n_blocks` x `block_len` tokens: block influence per layer,
   MLP-channel, head and hidden-channel importance;
3. a reference pass over the held-out windows (the last `eval_tokens` tokens of `ids`), then
   2 x n_layers scored edits: each layer skipped, each layer 4-bit quantized;
4. baseline perplexity (kompakt.evaluate) and speed;
5. the "where to cut" summary, and files under `out`.

Every number comes from kompakt.scoring, the functions prune.depth and prune.width rank by;
this package only arranges and presents them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from kompakt.analyze.breakdown import breakdown as count_parameters
from kompakt.analyze.experts import expert_layer_fields, expert_lines
from kompakt.analyze.output import check_out
from kompakt.analyze.result import Analysis
from kompakt.analyze.summary import layer_rows, where_to_cut
from kompakt.analyze.write import write_outputs
from kompakt.data import sample_blocks
from kompakt.errors import ConfigError, DataError
from kompakt.model.arch import arch_for, decoder_layers, is_moe, text_config
from kompakt.model.moe import top_k
from kompakt.model.progress import stage_line, stages
from kompakt.model.tokens import prefix_ids
from kompakt.scoring.channels import ChannelCollector
from kompakt.scoring.experts import ExpertCollector
from kompakt.scoring.layers import BlockInfluence
from kompakt.scoring.quant_sensitivity import quant_sensitivity
from kompakt.scoring.reference import build_reference
from kompakt.scoring.skip import skip_costs

logger = logging.getLogger(__name__)


def _model_info(loaded) -> dict:
    config = text_config(loaded.model)
    heads = int(config.num_attention_heads)
    return {
        "name": loaded.name,
        "path": str(loaded.path) if loaded.path else None,
        "model_type": config.model_type,
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "vocab_size": int(config.vocab_size),
        "context_length": loaded.context_length,
        "storage_dtype": str(loaded.storage_dtype).removeprefix("torch."),
        "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
        "device": str(loaded.device),
    }


def _split(ids: torch.Tensor, vocab: int, n_blocks: int, block_len: int, eval_tokens: int, window: int, seed: int):
    """(calibration blocks [n_blocks, block_len], held-out ids, held-out windows [1, window] each)."""
    flat = torch.as_tensor(ids).reshape(-1).long()
    n_windows = eval_tokens // window
    held = n_windows * window
    if flat.numel() < held + block_len:
        raise DataError(
            f"analysis needs at least {held + block_len} tokens ({held} held-out + one {block_len}-token "
            f"calibration block), got {flat.numel()}; give more data or lower --eval-tokens / --block-len"
        )
    if int(flat.max()) >= vocab or int(flat.min()) < 0:
        raise DataError("token ids fall outside the model's vocabulary; tokenize the data with this model's tokenizer")
    calibration, heldout = flat[:-held], flat[-held:]
    blocks = sample_blocks(calibration, n_blocks, block_len, seed=seed)
    windows = [heldout[i * window : (i + 1) * window].unsqueeze(0) for i in range(n_windows)]
    return blocks, heldout, windows


def _with_prefix(window: torch.Tensor, tokenizer) -> torch.Tensor:
    """[1, prefix + window]: what the tokenizer puts before text (Gemma's <bos>) in front of a
    held-out window, as kompakt.evaluate scores it. Without it Gemma 3's per-layer KLs were ~3x
    what its layers cost together (perplexity 53 instead of 19 on WikiText-2), and the planner's
    predictions with them."""
    prefix = prefix_ids(tokenizer) if tokenizer is not None else []
    if not prefix:
        return window
    return torch.cat([torch.tensor([prefix], dtype=window.dtype), window], dim=1)


def _check_sizes(loaded, n_blocks: int, block_len: int, eval_tokens: int, window: int) -> None:
    if min(n_blocks, block_len) < 1 or window < 2:
        raise ConfigError("n_blocks and block_len must be positive and the window at least 2 tokens")
    if eval_tokens < window:
        raise ConfigError(f"--eval-tokens {eval_tokens} is shorter than one window of {window}; raise it")
    context = loaded.context_length
    if max(window, block_len) > context:
        raise ConfigError(f"window and block length must fit the model's context ({context} tokens); lower them")


@torch.inference_mode()
def _calibrate(model, layers, blocks: torch.Tensor, batch: int, advance) -> tuple[list[float], object, object]:
    """One pass over the calibration blocks feeds every scorer (block influence, channels and,
    for an MoE, the experts' routing)."""
    influence = BlockInfluence(layers)
    collector = ChannelCollector(model, layers)
    experts = ExpertCollector(model) if is_moe(model) else None
    handles = influence.attach() + collector.attach() + (experts.attach() if experts else [])
    try:
        for start in range(0, blocks.shape[0], batch):
            chunk = blocks[start : start + batch]
            # Only the layers' activations are read: one position's logits, not a [batch, len, vocab]
            # tensor (1 GB for 4 x 256 tokens of Gemma 3's 262k vocabulary).
            model(input_ids=chunk, use_cache=False, logits_to_keep=1)
            advance(chunk.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return influence.values(), collector.result(), experts.result(top_k(model)) if experts else None


def _baseline(loaded, heldout: torch.Tensor, window: int, speed: bool) -> dict:
    from kompakt.evaluate import measure_speed, perplexity

    result = {"perplexity": perplexity(loaded, heldout, window=window, stride=window).to_dict()}
    result["speed"] = measure_speed(loaded).to_dict() if speed else None
    return result


def _measure(loaded, spec, layers, blocks, windows, *, bits, group_size, batch_size) -> dict:
    """The data-driven stages (calibration pass, skip cost, quantization sensitivity), timed."""
    model, timings = loaded.model, {}
    with stages() as progress:  # a bar on a terminal, one line per stage elsewhere
        stage = progress.add_task("calibration pass", total=blocks.shape[0])
        tick = time.perf_counter()
        influence, channels, experts = _calibrate(model, layers, blocks, batch_size,
                                                  lambda n: progress.advance(stage, n))  # fmt: skip
        timings["calibration_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        reference = build_reference(model, layers, windows)
        stage = progress.add_task("skip each layer", total=len(layers))
        skips = skip_costs(model, layers, reference, lambda: progress.advance(stage))
        timings["skip_cost_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        stage = progress.add_task(f"{bits}-bit quantize each layer", total=len(layers))
        quants, notes = quant_sensitivity(
            model, layers, spec, reference, bits=bits, group_size=group_size, advance=lambda: progress.advance(stage)
        )
        timings["quant_sensitivity_s"] = time.perf_counter() - tick
    return dict(
        influence=influence, channels=channels, experts=experts, skips=skips, quants=quants, notes=notes,
        reference={"ppl": reference.ppl, "scored_tokens": reference.scored_tokens}, timings=timings,
    )  # fmt: skip


def _settings(blocks, windows, window, bits, group_size, seed, ids) -> dict:
    return {
        "calibration": {
            "blocks": int(blocks.shape[0]), "block_len": int(blocks.shape[1]),
            "tokens": int(blocks.numel()), "seed": seed,
        },
        "heldout": {
            "windows": len(windows), "window": window,
            "tokens": len(windows) * window, "scored_tokens": len(windows) * (window - 1),
        },
        "quant": {"bits": bits, "group_size": group_size, "symmetric": True, "method": "RTN"},
        "data_tokens": int(torch.as_tensor(ids).numel()),
    }  # fmt: skip


def analyze(
    loaded,
    ids: torch.Tensor,
    *,
    out: str | Path | None = None,
    n_blocks: int = 8,
    block_len: int = 256,
    eval_tokens: int = 1024,
    eval_window: int = 256,
    bits: int = 4,
    group_size: int | None = 64,
    reference_eval: bool = True,
    speed: bool = True,
    seed: int = 0,
    batch_size: int = 4,
) -> Analysis:
    """Analyse `loaded` (a LoadedModel) on token ids `ids` (1-D) and optionally write files.

    The last `eval_tokens` tokens (cut to whole windows of `eval_window`) are held out for
    skip cost, quantization sensitivity and perplexity; `n_blocks` calibration blocks of
    `block_len` tokens are drawn from the rest. `reference_eval` adds kompakt.evaluate's
    perplexity and (with `speed`) prefill / generation speed. With `out`, writes
    analysis.json, PNG plots and a self-contained analysis.html there.

    A sentence encoder (`loaded.is_encoder`) is analysed on sentences instead: pass them as
    `ids` (a list of strings); see kompakt.analyze.encoder.analyze_encoder for its options.

    Raises:
        OutputPathError: `out` points into an existing file (checked before any work).
        ConfigError / DataError: sizes that do not fit the model or the data.
    """
    out_dir = check_out(out)  # before the model or the data are looked at
    if loaded.is_encoder:
        return _analyze_encoder(loaded, ids, out=out, bits=bits, group_size=group_size)
    _check_sizes(loaded, n_blocks, block_len, eval_tokens, eval_window)
    spec, layers = arch_for(loaded.model), decoder_layers(loaded.model)
    info = _model_info(loaded)
    blocks, heldout, windows = _split(ids, info["vocab_size"], n_blocks, block_len, eval_tokens, eval_window, seed)
    windows = [_with_prefix(w, loaded.tokenizer) for w in windows]
    blocks, windows = blocks.to(loaded.device), [w.to(loaded.device) for w in windows]
    began, cpu_began = time.perf_counter(), time.process_time()
    parts = count_parameters(loaded)
    measured = _measure(loaded, spec, layers, blocks, windows, bits=bits, group_size=group_size, batch_size=batch_size)
    timings = measured["timings"]
    tick = time.perf_counter()
    if reference_eval:
        stage_line("baseline perplexity" + (" and speed" if speed else ""))
    baseline = _baseline(loaded, heldout, eval_window, speed) if reference_eval else None
    timings["baseline_s"] = time.perf_counter() - tick
    skip_kl = [s.kl_mean for s in measured["skips"]]
    quant_kl = [q.kl_mean for q in measured["quants"]]
    timings["total_s"] = time.perf_counter() - began
    timings["cpu_s"] = time.process_time() - cpu_began  # all threads; wall time alone hides contention
    logger.info("analysed %s in %.1f s (%s)", loaded.name, timings["total_s"], timings)
    analysis = Analysis(
        model=info,
        settings=_settings(blocks, windows, eval_window, bits, group_size, seed, ids),
        breakdown=parts,
        layers=layer_rows(parts, measured),
        channels=measured["channels"],
        reference=measured["reference"],
        baseline=baseline,
        summary=where_to_cut(parts, measured["influence"], skip_kl, quant_kl, measured["channels"]),
        timings=timings,
        notes=measured["notes"],
        experts=measured["experts"],
    )
    if analysis.experts is not None:
        for row in analysis.layers:
            row["experts"] = expert_layer_fields(analysis.experts, row["index"])
        analysis.summary["lines"] += expert_lines(analysis.experts)
    if out_dir is not None:
        stage_line(f"writing analysis.json, plots and analysis.html to {out_dir}")
        analysis.files = write_outputs(analysis, out_dir)
    return analysis


def _analyze_encoder(loaded, sentences, **options) -> Analysis:
    """The encoder analysis (kompakt.analyze.encoder), imported when used: it imports this module."""
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)):
        raise DataError(f"{loaded.name} is an embedding model: analyse it on sentences (a list of strings), not token ids")
    from kompakt.analyze.encoder import analyze_encoder

    return analyze_encoder(loaded, list(sentences), **options)
