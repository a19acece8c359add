"""The search `compress --target params=F` runs before planning (see kompakt.auto.searched_shape).

Its proxies get SEARCH_SHARE of the budget (CANDIDATES shapes without one); the winner is planned
as the first attempt and healed with the rest. Without a search (a model it cannot reshape, a
budget too small for one candidate) the planner keeps the width rule and says why.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.auto.search.run import PROXY_SHARE, search
from kompakt.auto.searched_shape import SEARCH_DIR, SearchedShape
from kompakt.auto.target import Target
from kompakt.errors import ConfigError
from kompakt.recipe.schema import DataSpec, Step

SEARCH_SHARE = 0.4  # of the budget for the candidates' proxies; the rest heals the winner
CANDIDATES = 4  # without a budget: the pure cuts come first in the spread
PROXY_TOKENS = 4096


def search_budget_s(budget_s: float | None) -> float | None:
    """The search's own budget: its proxies stop at PROXY_SHARE of it, so SEARCH_SHARE of ours."""
    return None if budget_s is None else SEARCH_SHARE * budget_s / PROXY_SHARE


def search_shape(model: str | None, target: Target, data: str | None, spec: DataSpec, out_dir: Path,
                 budget_s: float | None, seed: int, choices: list[str]) -> SearchedShape | None:  # fmt: skip
    """The searched winner for a params= target, or None (the width rule; the reason in
    `choices`). A speed= factor no shape reaches is the user's refusal, raised."""
    if target.goal != "params":
        return None
    text = f"params={target.params:g}" + (f",speed={target.speed:g}x" if target.speed is not None else "")
    share = search_budget_s(budget_s)
    try:
        result = search(model, target=text, budget=None if share is None else f"{int(share)}s", data=data,
                        out=out_dir / SEARCH_DIR, count=CANDIDATES if budget_s is None else 8, finalists=1,
                        proxy_tokens=PROXY_TOKENS, heal_tokens=0, eval_tokens=spec.eval_tokens, window=spec.block_len,
                        blocks=spec.calibration_blocks, latency=target.speed is not None, seed=seed)  # fmt: skip
    except ConfigError as error:
        if target.speed is not None:
            raise
        choices.append(f"params={target.params:g}: no shape search ({error}); the width rule instead")
        return None
    best = next((r for r in result.rows if r["index"] == result.winner), None)
    if best is None:
        choices.append(f"params={target.params:g}: no searched shape finished its proxy; the width rule instead")
        return None
    tried = sum(1 for r in result.rows if r.get("proxy"))
    return SearchedShape([Step.from_dict(s) for s in best["steps"]], best["describe"], best["params_fraction"],
                         best["proxy"]["kl_mean"], tried, result.wall_s)  # fmt: skip
