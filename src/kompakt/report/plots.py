"""The report's own plot: size vs quality of every step, with the Pareto frontier (matplotlib
Agg, returned as PNG bytes so the HTML embeds them)."""

from __future__ import annotations

from kompakt.analyze.plots import png_bytes
from matplotlib.figure import Figure


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller size and lower KL), sorted by size."""
    frontier, best = [], float("inf")
    for size, kl in sorted(points):
        if kl < best:
            frontier.append((size, kl))
            best = kl
    return frontier


def trajectory_plot(rows: list[dict], original_bytes: float | None) -> bytes | None:
    """Size on disk (MB) vs KL to the original for every evaluated step; None without data."""
    points = [(r["bytes"] / 1e6, r["kl"], r) for r in rows if r.get("bytes") and r.get("kl") is not None]
    if not points:
        return None
    figure = Figure(figsize=(8, 4))
    axis = figure.add_subplot()
    for attempt in sorted({r["attempt"] for *_, r in points}, key=lambda a: a or 0):
        mine = [(x, y, r) for x, y, r in points if r["attempt"] == attempt]
        axis.plot([p[0] for p in mine], [p[1] for p in mine], marker="o", ms=5, alpha=0.8, label="steps" if attempt is None else f"attempt {attempt}")
        for x, y, r in mine:
            axis.annotate(f"{r['step']}:{r['pass']}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto([(x, y) for x, y, _ in points])
    axis.plot([p[0] for p in front], [p[1] for p in front], color="black", lw=1, ls="--", label="Pareto frontier")
    if original_bytes:
        axis.axvline(original_bytes / 1e6, color="#888", lw=0.8, ls=":")
        axis.annotate("original in fp16", (original_bytes / 1e6, 0), fontsize=7, rotation=90, va="bottom")
    axis.set_xlabel("size on disk of the step's model directory (MB)")
    axis.set_ylabel("KL to the original (mean, nats)")
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.legend(fontsize=8)
    axis.set_title("Trajectory: size vs quality")
    return png_bytes(figure)
