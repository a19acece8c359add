"""`compress --target params=F`: the shape is chosen by measurement (kompakt search's proxies).

This module is what the planner reads (the winner and its one-line choice); the search that
finds it is kompakt.auto.search.for_plan.

Which cut keeps the most at a parameter fraction depends on the model (fewer layers, narrower
MLPs, fewer heads, a smaller hidden size, or a mix), so the planner does not follow one rule:
it runs `kompakt search` (kompakt.auto.search.run) in `out/search` with a share of the budget —
each candidate shape cut by the passes' importance scores, distilled briefly, ranked by KL to
the original — and plans the winner's cut, healed by distillation with the rest of the budget.
`speed=Nx` beside `params=` keeps only shapes llama.cpp times at that factor.

The search is the planner's first attempt only. The back-off (half the cut) stays the width
rule, and a model the search cannot reshape (MoE, families whose head size follows the hidden
size) or a budget too small for one candidate falls back to the width rule, with the reason in
the plan's choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.auto.target import Target
from kompakt.recipe.schema import Step

SEARCH_DIR = "search"  # in the compress run directory


@dataclass
class SearchedShape:
    """The winner of the planner's search: its cut and what it measured."""

    steps: list[Step]
    describe: str
    params_fraction: float
    proxy_kl: float
    tried: int
    seconds: float

    def choice(self, target: Target) -> str:
        return (f"params={target.params:g}: {self.tried} shapes searched by a short distillation "
                f"({SEARCH_DIR}/search.json, {self.seconds:.0f} s); the lowest KL ({self.proxy_kl:.3f}) was "
                f"{self.describe}, {self.params_fraction:.1%} of the parameters")  # fmt: skip
