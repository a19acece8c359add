"""`analyze` for sentence encoders (BERT family): the same four questions, asked of embeddings.

Where the parameters are is counted as for a decoder (analyze.breakdown). What matters and
what is fragile are measured on sentences, by what a user of an embedding model keeps or
loses, the pooled sentence embedding:

1. breakdown of parameters and bytes (no data);
2. a calibration pass over `calib_sentences` padded sentences (the scorers read the attention
   mask and leave padding out): block influence per layer (scoring.layers) and FFN-
   channel, head and hidden-channel importance (scoring.channels, through the ArchSpec roles);
3. the held-out sentences (the last `eval_sentences`) embedded once as the reference, then
   2 x n_layers edits scored against it: each layer skipped (scoring.embedding_edits, the encoder
   analogue of skip KL) and each layer's Linears RTN-quantized (scoring.embedding_quant); the
   cost is 1 - mean cosine of the sentence embeddings (with `per_linear`, each Linear alone too);
4. the "where to cut" summary, and files under `out`.

Perplexity, next-token KL and generation speed are decoder measures and are not run (a note
says so); `kompakt eval` measures an encoder's speed and its fidelity to a reference.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from kompakt.analyze.breakdown import breakdown as count_parameters
from kompakt.analyze.output import check_out
from kompakt.analyze.result import Analysis
from kompakt.analyze.summary import layer_rows, where_to_cut
from kompakt.analyze.write import write_outputs
from kompakt.errors import ConfigError, DataError
from kompakt.model.arch import arch_for, decoder_layers, linear_modules
from kompakt.model.encode import input_limit
from kompakt.model.inputs import model_inputs
from kompakt.model.progress import stage_line, stages
from kompakt.scoring.channels import ChannelCollector
from kompakt.scoring.embedding_quant import embedding_quant_scores
from kompakt.scoring.embedding_edits import embedding_skip_scores, pooled_embeddings, sentence_batches
from kompakt.scoring.layers import BlockInfluence, rank_layers

logger = logging.getLogger(__name__)

SKIPPED_NOTE = (
    "embedding model: perplexity, next-token KL and generation speed are not measured (no language-model "
    "head); layer costs are 1 - cosine of the pooled sentence embeddings. Speed and fidelity: kompakt eval"
)


def _encoder_info(loaded) -> dict:
    """Shape of the encoder, read from its modules where configs differ (DistilBERT's dim / hidden_dim)."""
    model, spec = loaded.model, arch_for(loaded.model)
    linears = linear_modules(decoder_layers(model)[0], spec)
    up = linears.get("mlp.up") or linears.get("mlp.gate_up")
    intermediate = up.out_features // (2 if "mlp.gate_up" in linears else 1)
    heads = int(model.config.num_attention_heads)
    embeddings = model.get_input_embeddings().weight
    return {
        "name": loaded.name,
        "path": str(loaded.path) if loaded.path else None,
        "model_type": model.config.model_type,
        "task": "embed",
        "layers": len(decoder_layers(model)),
        "hidden_size": int(embeddings.shape[1]),
        "intermediate_size": int(intermediate),
        "heads": heads,
        "kv_heads": heads,
        "vocab_size": int(embeddings.shape[0]),
        "context_length": input_limit(loaded),
        "pooling": {"mode": loaded.pooling.mode, "normalize": loaded.pooling.normalize},
        "storage_dtype": str(loaded.storage_dtype).removeprefix("torch."),
        "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
        "device": str(loaded.device),
    }


def _split(sentences: list[str], calib_sentences: int, eval_sentences: int) -> tuple[list[str], list[str]]:
    """(calibration, held-out): the held-out set is the last `eval_sentences`; calibration the
    first `calib_sentences` of the rest, so no sentence is in both."""
    if min(calib_sentences, eval_sentences) < 1:
        raise ConfigError("calib_sentences and eval_sentences must be at least 1")
    sentences = [s for s in sentences if s.strip()]
    if len(sentences) < eval_sentences + 1:
        raise DataError(
            f"analysis needs at least {eval_sentences + 1} sentences ({eval_sentences} held-out + calibration), "
            f"got {len(sentences)}; give more data or lower --eval-sentences"
        )
    return sentences[:-eval_sentences][:calib_sentences], sentences[-eval_sentences:]


@torch.inference_mode()
def _calibrate(loaded, layers, batches, advance) -> tuple[list[float], object]:
    """Block influence and channel importance over padded sentences; both leave padding out."""
    influence, collector = BlockInfluence(layers), ChannelCollector(loaded.model, layers)
    handles = influence.attach() + collector.attach()
    try:
        for batch in batches:
            influence.before(batch)
            collector.before(batch)
            loaded.model(**model_inputs(batch))
            advance(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return influence.values(), collector.result()


def _measure(loaded, calibration, heldout, *, bits, group_size, batch_size, per_linear) -> dict:
    """Calibration pass, skip cost and quantization sensitivity, timed."""
    model, pooling, timings = loaded.model, loaded.pooling, {}
    spec, layers = arch_for(model), decoder_layers(model)
    with stages() as progress:
        stage = progress.add_task("calibration pass", total=len(calibration))
        tick = time.perf_counter()
        limit = input_limit(loaded)
        batches = sentence_batches(loaded.tokenizer, calibration, limit, batch_size, loaded.device)
        influence, channels = _calibrate(loaded, layers, batches, lambda n: progress.advance(stage, n))
        timings["calibration_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        batches = sentence_batches(loaded.tokenizer, heldout, limit, batch_size, loaded.device)
        reference = pooled_embeddings(model, batches, pooling)
        stage = progress.add_task("skip each layer", total=len(layers))
        skips = embedding_skip_scores(model, layers, batches, pooling, reference, lambda: progress.advance(stage))
        timings["skip_cost_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        stage = progress.add_task(f"{bits}-bit quantize each layer", total=len(layers))
        quants, notes = embedding_quant_scores(
            model, layers, spec, batches, pooling, reference, bits=bits, group_size=group_size,
            per_linear=per_linear, advance=lambda: progress.advance(stage),
        )  # fmt: skip
        timings["quant_sensitivity_s"] = time.perf_counter() - tick
    return dict(influence=influence, channels=channels, skips=skips, quants=quants, notes=notes, timings=timings)


def _tokens(tokenizer, sentences: list[str], limit: int) -> int:
    return sum(len(ids) for ids in tokenizer(sentences, truncation=True, max_length=limit)["input_ids"])


def _settings(loaded, calibration: list[str], heldout: list[str], bits: int, group_size, source) -> dict:
    limit = input_limit(loaded)
    return {
        "task": "embed",
        "data": source or "sentences given in code",
        "calibration": {"sentences": len(calibration), "tokens": _tokens(loaded.tokenizer, calibration, limit)},
        "heldout": {"sentences": len(heldout), "tokens": _tokens(loaded.tokenizer, heldout, limit)},
        "truncation": f"sentences cut to their first {limit} tokens (kompakt.model.encode rule)",
        "quant": {"bits": bits, "group_size": group_size, "symmetric": True, "method": "RTN"},
        "cost": "1 - mean cosine of the pooled sentence embeddings vs the unedited model, held-out sentences",
    }


def _summary(parts, measured: dict, skip_loss: list[float], quant_loss: list[float]) -> dict:
    summary = where_to_cut(parts, measured["influence"], skip_loss, quant_loss, measured["channels"], cost="1-cos")
    # Encoders are often halved (DistilBERT: 6 of 12 layers), so the whole order is worth a line.
    summary["skip_order"] = rank_layers(skip_loss)
    order = ", ".join(f"{i} ({skip_loss[i]:.3f})" for i in summary["skip_order"])
    summary["lines"].insert(1, f"All layers, cheapest to drop first (1-cos when skipped): {order}.")
    return summary


def analyze_encoder(
    loaded,
    sentences: list[str],
    *,
    out: str | Path | None = None,
    calib_sentences: int = 64,
    eval_sentences: int = 64,
    bits: int = 4,
    group_size: int | None = 64,
    batch_size: int = 32,
    per_linear: bool = False,
    source: str | None = None,
) -> Analysis:
    """Analyse the encoder `loaded` on `sentences` (see the module docstring for the stages).

    `per_linear` also quantizes each Linear alone (layers[i]["quant"]["per_linear"][role]): one
    more pass over the held-out sentences per Linear, about 4x the whole analysis on MiniLM.

    Raises:
        OutputPathError: `out` points into an existing file (checked before any work).
        ConfigError / DataError: sizes below 1, or fewer sentences than the held-out set needs.
    """
    out_dir = check_out(out)
    calibration, heldout = _split(list(sentences), calib_sentences, eval_sentences)
    info = _encoder_info(loaded)
    began, cpu_began = time.perf_counter(), time.process_time()
    parts = count_parameters(loaded)
    measured = _measure(loaded, calibration, heldout, bits=bits, group_size=group_size, batch_size=batch_size,
                        per_linear=per_linear)  # fmt: skip
    timings = measured["timings"]
    skip_loss, quant_loss = [s.loss for s in measured["skips"]], [q.loss for q in measured["quants"]]
    timings["total_s"] = time.perf_counter() - began
    timings["cpu_s"] = time.process_time() - cpu_began
    logger.info("analysed %s in %.1f s (%s)", loaded.name, timings["total_s"], timings)
    settings = _settings(loaded, calibration, heldout, bits, group_size, source)
    reference = {"sentences": len(heldout), "embedding_dim": info["hidden_size"]}
    summary = _summary(parts, measured, skip_loss, quant_loss)
    analysis = Analysis(
        model=info, settings=settings, breakdown=parts, layers=layer_rows(parts, measured),
        channels=measured["channels"], reference=reference, baseline=None, summary=summary, timings=timings,
        notes=[SKIPPED_NOTE, *measured["notes"]],
    )  # fmt: skip
    if out_dir is not None:
        stage_line(f"writing analysis.json, plots and analysis.html to {out_dir}")
        analysis.files = write_outputs(analysis, out_dir)
    return analysis
