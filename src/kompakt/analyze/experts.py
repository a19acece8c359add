"""The Mixture-of-Experts part of an analysis: routing per layer and per expert.

The numbers come from kompakt.scoring.experts (the same function moe.prune ranks experts by);
this module only turns them into layer-row fields, "where to cut" lines and an HTML table.
"""

from __future__ import annotations

import html

import numpy as np

from kompakt.scoring.experts import ExpertStats


def expert_layer_fields(stats: ExpertStats, index: int) -> dict:
    """What one layer's row of the analysis carries about its experts."""
    share = stats.share[index]
    return {
        "routing_entropy": stats.token_entropy[index],
        "load_entropy": stats.load_entropy[index],
        "share": [float(v) for v in share],
        "reap": [float(v) for v in stats.reap[index]],
        "least_routed": int(np.argmin(share)),
        "lowest_reap": int(np.argmin(stats.reap[index])),
    }


def expert_lines(stats: ExpertStats) -> list[str]:
    """Summary lines: how evenly each layer routes, and which experts cost least to remove."""
    n_experts = len(stats.frequency[0])
    entropies = ", ".join(f"{v:.2f}" for v in stats.token_entropy)
    loads = ", ".join(f"{v:.2f}" for v in stats.load_entropy)
    lowest = "; ".join(f"layer {i}: expert {int(np.argmin(r))} (REAP {float(np.min(r)):.3g}, "
                       f"{float(stats.share[i][int(np.argmin(r))]):.1%} of tokens)"
                       for i, r in enumerate(stats.reap))  # fmt: skip
    return [
        f"Experts: {n_experts} per layer, top-{stats.top_k}; router entropy per token (nats, uniform = "
        f"{np.log(n_experts):.2f}) by layer: {entropies}; load balance (1 = even): {loads}.",
        f"Lowest REAP saliency (gate x expert output norm; the expert moe.prune removes first): {lowest}.",
    ]


def experts_html(stats: ExpertStats | None, table) -> str:
    """Per layer and expert: share of tokens routed and REAP saliency ('' for a dense model)."""
    if stats is None:
        return ""
    n_experts = len(stats.frequency[0])
    header = ["layer", "entropy", "balance", *(f"e{e} share / REAP" for e in range(n_experts))]
    rows = [[i, f"{stats.token_entropy[i]:.2f}", f"{stats.load_entropy[i]:.2f}",
             *(f"{stats.share[i][e]:.1%} / {stats.reap[i][e]:.3g}" for e in range(n_experts))]
            for i in range(len(stats.tokens))]  # fmt: skip
    legend = ("share: fraction of tokens routed to the expert (a layer sums to top-k); REAP: mean over those "
              "tokens of router probability x norm of the expert output")
    return "<h2>Experts (routing on the calibration tokens)</h2>" + table(header, rows) + f"<p>{html.escape(legend)}</p>"
