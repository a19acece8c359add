"""PNG plots of an Analysis (matplotlib Agg, no pyplot global state): returned as bytes so the
caller writes them atomically and the HTML page can embed them."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kompakt.analyze.result import Analysis


def png_bytes(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def layer_importance(analysis: Analysis) -> bytes:
    """Block influence (bars) and skip-cost KL (line, own axis) per decoder layer."""
    index = np.arange(len(analysis.layers))
    figure = Figure(figsize=(9, 3.6))
    axis = figure.add_subplot()
    axis.bar(index, analysis.column("block_influence"), color="#4c78a8", label="block influence (1 - cos)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("layer")
    axis.set_ylabel("block influence")
    twin = axis.twinx()
    key, label = analysis.cost
    twin.plot(index, np.clip(analysis.column("skip", key), 1e-6, None), color="#e45756", marker="o", ms=3,
              label=f"{key.upper() if key == 'kl' else '1 - cos'} when skipped")  # fmt: skip
    twin.set_ylabel(f"when skipped: {label}")
    twin.set_yscale("log")
    handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axis.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8, framealpha=0.8)
    axis.set_title("Layer importance")
    return png_bytes(figure)


def quant_sensitivity(analysis: Analysis) -> bytes:
    """KL when only that layer's Linears are RTN-quantized."""
    quant = analysis.settings["quant"]
    index = np.arange(len(analysis.layers))
    figure = Figure(figsize=(9, 3.2))
    axis = figure.add_subplot()
    key, label = analysis.cost
    axis.bar(index, analysis.column("quant", key), color="#f58518")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("layer")
    axis.set_ylabel(label)
    axis.set_title(f"Quantization sensitivity: {quant['bits']}-bit RTN of one layer, group {quant['group_size']}")
    return png_bytes(figure)


def channel_importance(analysis: Analysis) -> bytes | None:
    """Per layer: MLP channel importance relative to the layer median (box plot, 1-99 % whiskers)."""
    if analysis.channels is None or not any(len(row) for row in analysis.channels.mlp):
        return None  # (an MoE: no dense MLP channels)
    relative = [row / np.median(row) if np.median(row) > 0 else row for row in analysis.channels.mlp]
    figure = Figure(figsize=(9, 3.4))
    axis = figure.add_subplot()
    axis.boxplot([np.clip(r, 1e-4, None) for r in relative], positions=np.arange(len(relative)), whis=(1, 99), showfliers=False)
    axis.set_yscale("log")
    axis.axhline(0.1, color="#e45756", lw=0.8, ls="--")
    axis.tick_params(axis="x", labelsize=7)
    axis.set_xlabel("layer")
    axis.set_ylabel("channel / layer median")
    axis.set_title("MLP channel importance (activation RMS at down_proj input)")
    return png_bytes(figure)


def all_plots(analysis: Analysis) -> dict[str, bytes]:
    """file name -> PNG bytes."""
    plots = {
        "layer_importance.png": layer_importance(analysis),
        "quant_sensitivity.png": quant_sensitivity(analysis),
        "channel_importance.png": channel_importance(analysis),
    }
    return {name: data for name, data in plots.items() if data is not None}
