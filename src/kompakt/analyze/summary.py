"""The "where to cut" summary: the few findings a user acts on, as data and as lines of text."""

from __future__ import annotations

import math

import numpy as np

from kompakt.analyze.breakdown import Breakdown
from kompakt.scoring.channels import ChannelImportance
from kompakt.scoring.layers import rank_layers

MLP_TINY = 0.1  # a channel below 10 % of its layer's median importance
HEAD_TINY = 0.5  # a head below half of its layer's median importance


def tiny_fraction(values: np.ndarray, threshold: float = 0.1) -> float:
    """Fraction of entries below `threshold` x the median of their layer (the median, not the
    mean: a few outlier channels with huge activations would inflate the mean)."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values)) if values.size else 0.0
    return float((values < threshold * median).mean()) if median > 0 else 0.0


def _lowest(values: list[float], k: int) -> list[int]:
    """The k least important layers, in prune.depth's order (kompakt.scoring.layers.rank_layers)."""
    return rank_layers(values)[:k]


def _highest(values: list[float], k: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: (-math.inf if math.isnan(values[i]) else -values[i], i))
    return order[:k]


def _human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.0f}"


def _fraction_below(rows: list, threshold: float) -> float:
    sizes = [len(row) for row in rows]
    total = sum(sizes)
    if not total:
        return 0.0
    return sum(tiny_fraction(row, threshold) * size for row, size in zip(rows, sizes)) / total


def where_to_cut(
    breakdown: Breakdown,
    block_influence: list[float],
    skip_kl: list[float],
    quant_kl: list[float],
    channels: ChannelImportance | None,
    k: int | None = None,
    cost: str = "KL",
) -> dict:
    """Rank layers, state parameter shares and channel headroom.

    `k` (default: a sixth of the layers, at least 1) is how many layers each ranking names.
    `skip_kl` and `quant_kl` are per-layer costs named `cost` in the text: next-token KL for a
    decoder, 1 - cosine of the sentence embeddings ("1-cos") for an encoder.
    """
    n_layers = len(block_influence)
    k = k or max(1, n_layers // 6)
    by_bi = _lowest(block_influence, k)
    by_skip = _lowest(skip_kl, k)
    agree = [i for i in by_skip if i in by_bi]
    sensitive = _highest(quant_kl, k)
    shares = {name: breakdown.share(name) for name, count in breakdown.params.items() if count}
    result = {
        "k": k,
        "lowest_block_influence": by_bi,
        "cheapest_to_skip": by_skip,
        "agreement": agree,
        "param_shares": shares,
        "most_quant_sensitive": sensitive,
        "least_quant_sensitive": _lowest(quant_kl, k),
        "mlp_tiny_fraction": _fraction_below(channels.mlp, MLP_TINY) if channels and any(map(len, channels.mlp))
        else None,  # an MoE has no dense MLP channels
        "head_tiny_fraction": _fraction_below(channels.heads, HEAD_TINY) if channels else None,
        "thresholds": {"mlp_tiny": MLP_TINY, "head_tiny": HEAD_TINY},
        "cost": cost,
    }
    result["lines"] = _lines(result, breakdown, skip_kl, quant_kl)
    return result


def _lines(result: dict, breakdown: Breakdown, skip_kl: list[float], quant_kl: list[float]) -> list[str]:
    k, cost = result["k"], result.get("cost", "KL")
    digits = 3 if cost == "KL" else 4  # 1 - cosine of a 4-bit layer is often below 0.001
    names = lambda indices: ", ".join(str(i) for i in indices)  # noqa: E731
    lines = [
        f"Layers cheapest to drop (lowest skip {cost}): {names(result['cheapest_to_skip'])} "
        f"({cost} {', '.join(f'{skip_kl[i]:.{digits}f}' for i in result['cheapest_to_skip'])}); "
        f"lowest block influence: {names(result['lowest_block_influence'])} — "
        f"{len(result['agreement'])} of {k} agree.",
    ]
    order = sorted(result["param_shares"].items(), key=lambda item: -item[1])
    parts = [f"{name} {share:.0%} ({_human(breakdown.params[name])})" for name, share in order]
    tied = " (embeddings tied to lm_head, counted once)" if breakdown.tied_embeddings else ""
    lines.append(f"Parameters {_human(breakdown.total_params)}: {', '.join(parts)}{tied}.")
    lines.append(
        f"Most quantization-sensitive layers (keep at higher precision): {names(result['most_quant_sensitive'])} "
        f"({cost} {', '.join(f'{quant_kl[i]:.{digits}f}' for i in result['most_quant_sensitive'])}); "
        f"least: {names(result['least_quant_sensitive'])}."
    )
    heads = f"attention heads below {HEAD_TINY:.0%} of their layer's median: {result['head_tiny_fraction']:.1%}."
    if result["mlp_tiny_fraction"] is not None:
        lines.append(
            f"MLP channels below {MLP_TINY:.0%} of their layer's median importance: {result['mlp_tiny_fraction']:.1%}; "
            + heads
        )
    elif result["head_tiny_fraction"] is not None:
        lines.append(heads[0].upper() + heads[1:])
    return lines


def layer_rows(parts, measured: dict) -> list[dict]:
    """One row per layer of the analysis (decoder or encoder): size, influence, skip and 4-bit cost."""
    return [
        {
            "index": i,
            "params": parts.per_layer[i]["total"],
            "bytes": parts.per_layer[i]["total"] * parts.bytes_per_param,
            "block_influence": measured["influence"][i],
            "skip": measured["skips"][i].to_dict(),
            "quant": measured["quants"][i].to_dict(),
            "mlp_tiny_fraction": tiny_fraction(measured["channels"].mlp[i], MLP_TINY),
        }
        for i in range(len(measured["skips"]))
    ]
