"""The Pareto set of the searched candidates and the reasons the winner won.

Objectives, all minimised: parameters, generation latency (1 / measured llama.cpp generation
tokens/s; left out when no speed was measured) and KL to the original (after healing for the
finalists, else after the proxy distillation: the best KL each candidate reached).
"""

from __future__ import annotations


def quality(row: dict) -> float | None:
    """The best KL this candidate reached: healed when it was a finalist, else the proxy's."""
    final = (row.get("final") or {}).get("kl_mean")
    return final if final is not None else (row.get("proxy") or {}).get("kl_mean")


def _latency(row: dict) -> float | None:
    tps = (row.get("latency") or {}).get("generate_tps")
    return 1.0 / tps if tps else None


def _objectives(row: dict, with_latency: bool) -> tuple[float, ...]:
    values = (float(row["params"]), float(quality(row)))
    return values + ((float(_latency(row)),) if with_latency else ())


def pareto_set(rows: list[dict]) -> list[int]:
    """Indices (row["index"]) of the candidates no other candidate beats on every objective."""
    scored = [r for r in rows if quality(r) is not None]
    with_latency = bool(scored) and all(_latency(r) is not None for r in scored)
    points = {r["index"]: _objectives(r, with_latency) for r in scored}

    def dominated(a: tuple[float, ...]) -> bool:
        return any(all(x <= y for x, y in zip(b, a)) and b != a for b in points.values())

    return sorted(i for i, p in points.items() if not dominated(p))


def why_winner(rows: list[dict], winner: int, pareto: list[int]) -> str:
    """One sentence: what the winner measured against the runner-up, speed and the front."""
    by_index = {r["index"]: r for r in rows}
    best = by_index[winner]
    healed = [r for r in rows if (r.get("final") or {}).get("kl_mean") is not None]
    pool = healed if best in healed else [r for r in rows if quality(r) is not None]
    stage = "after healing" if best in healed else "after the proxy distillation (no budget left to heal)"
    others = sorted((r for r in pool if r["index"] != winner), key=quality)
    text = f"candidate {winner} ({best['kind']}) has the lowest KL {stage}: {quality(best):.4f}"
    if others:
        text += f" vs {quality(others[0]):.4f} for candidate {others[0]['index']} ({others[0]['kind']})"
    tps = (best.get("latency") or {}).get("generate_tps")
    if tps:
        fastest = max(((r.get("latency") or {}).get("generate_tps") or 0.0) for r in rows)
        text += f"; it generates {tps:.0f} tok/s in llama.cpp (fastest candidate {fastest:.0f})"
    text += "; on the Pareto front" if winner in pareto else "; not on the Pareto front"
    return text
