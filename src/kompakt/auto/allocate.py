"""Per-tensor GGUF types by measurement: a multiple-choice knapsack over the tensors.

Each decision (one weight tensor; a tied embedding / output matrix is one tensor and so one
decision) has options (type, bytes in the file, predicted KL increase: kompakt.scoring.
tensor_sensitivity), and the predicted KL of the model is the sum over decisions. Two questions:

- `within_bytes`: the lowest predicted KL whose file fits a byte budget (`--target size=`/`bytes=`);
- `within_kl`: the fewest bytes whose predicted KL stays within a ceiling (the quality floor).

Method: Lagrangian relaxation over each decision's lower convex hull, then a greedy repair.
Minimising KL + λ·bytes splits into independent per-decision choices, and as λ falls the
optimal choices walk each decision's convex hull (bytes up, KL down) one hull step at a time, in
the order of the steps' KL saved per byte: so every λ is visited by sorting all hull steps by
that ratio once (Sinha & Zoltners 1979: this is also the LP relaxation's solution path). The
walk stops where the budget (or the ceiling) is reached; the integer gap of that point is at
most one hull step. The repair closes most of it: skip a step that does not fit and keep taking
later ones that do (other decisions' smaller steps), then single-decision moves to any option,
hull or not, that improve the objective within the constraint, until none does. Tested against
brute force on small instances (tests/auto/test_allocate.py): never worse than the optimum by
more than the largest hull step, and equal on almost every random instance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kompakt.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One way to store a decision's tensor: its type, bytes in the file, predicted KL."""

    type: str
    bytes: int
    kl: float


@dataclass
class Decision:
    """A tensor to type (`name` is the recipe key) and its options."""

    name: str
    options: list[Option]

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"{self.name}: no type to choose from")


@dataclass
class Allocation:
    """The chosen type per decision, and the totals (bytes include the fixed part of the file)."""

    types: dict[str, str]
    bytes: int
    kl: float
    fixed: int = 0
    chosen: dict[str, Option] = field(default_factory=dict, repr=False)

    def counts(self) -> Counter:
        """type -> number of decisions stored in it."""
        return Counter(self.types.values())


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, KL), from the fewest bytes up: each step buys KL at a
    worse rate than the one before (dominated options and those above the hull dropped)."""
    ordered = sorted(options, key=lambda o: (o.bytes, o.kl))
    frontier: list[Option] = []
    for option in ordered:
        if frontier and option.kl >= frontier[-1].kl:
            continue  # more bytes, no less KL
        if frontier and option.bytes == frontier[-1].bytes:
            frontier[-1] = option
            continue
        frontier.append(option)
    hull: list[Option] = []
    for option in frontier:
        while len(hull) >= 2 and _rate(hull[-2], hull[-1]) <= _rate(hull[-1], option):
            hull.pop()  # hull[-1] lies on or above the segment from hull[-2] to option
        hull.append(option)
    return hull


def _rate(low: Option, high: Option) -> float:
    """KL saved per byte spent when moving from `low` to `high`."""
    return (low.kl - high.kl) / (high.bytes - low.bytes)


class _State:
    """The current option of every decision and the running totals."""

    def __init__(self, decisions: list[Decision], fixed: int) -> None:
        self.decisions = decisions
        self.current = [min(d.options, key=lambda o: (o.bytes, o.kl)) for d in decisions]
        self.fixed = fixed
        self.bytes = fixed + sum(o.bytes for o in self.current)
        self.kl = sum(o.kl for o in self.current)

    def move(self, index: int, option: Option) -> None:
        old = self.current[index]
        self.bytes += option.bytes - old.bytes
        self.kl += option.kl - old.kl
        self.current[index] = option

    def result(self) -> Allocation:
        chosen = {d.name: o for d, o in zip(self.decisions, self.current)}
        kl = sum(o.kl for o in self.current)  # summed afresh: no drift from the running total
        return Allocation({n: o.type for n, o in chosen.items()}, self.bytes, kl, self.fixed, chosen)


def _steps(decisions: list[Decision]) -> list[tuple[float, int, int, Option]]:
    """Every hull step (rate, decision, position on its hull, option), best rate first; within
    a decision the rates fall along the hull, so the order keeps each decision's steps in turn."""
    steps = []
    for index, decision in enumerate(decisions):
        hull = _hull(decision.options)
        for position in range(1, len(hull)):
            steps.append((_rate(hull[position - 1], hull[position]), index, position, hull[position]))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    return steps


def smallest_bytes(decisions: list[Decision], fixed: int = 0) -> int:
    """Bytes of the smallest file any allocation gives."""
    return fixed + sum(min(o.bytes for o in d.options) for d in decisions)


def within_bytes(decisions: list[Decision], budget: int, fixed: int = 0) -> Allocation:
    """The lowest predicted KL whose bytes (with `fixed`) are at most `budget`.

    Raises ConfigError when even the smallest allocation does not fit.
    """
    state = _State(decisions, fixed)
    if state.bytes > budget:
        raise ConfigError(
            f"a file of at most {budget / 1e6:.1f} MB is below the smallest this model can be stored in "
            f"({state.bytes / 1e6:.1f} MB with every tensor in its smallest type); give at least that"
        )
    blocked: set[int] = set()  # decisions whose next hull step did not fit: their later ones cannot follow
    for _, index, _, option in _steps(decisions):
        if index in blocked:
            continue
        if state.bytes - state.current[index].bytes + option.bytes <= budget:
            state.move(index, option)
        else:
            blocked.add(index)
    _improve(state, max_bytes=budget, max_kl=None)
    return state.result()


def within_kl(decisions: list[Decision], ceiling: float, fixed: int = 0) -> Allocation:
    """The fewest bytes whose predicted KL is at most `ceiling` (the lowest-KL allocation, with
    its KL above the ceiling, when none reaches it)."""
    state = _State(decisions, fixed)
    for _, index, _, option in _steps(decisions):
        if state.kl <= ceiling:
            break
        state.move(index, option)
    if state.kl > ceiling:
        return state.result()  # every decision at its lowest-KL option: the best there is
    _improve(state, max_bytes=None, max_kl=ceiling)
    return state.result()


def _moves(state: _State) -> tuple[list[tuple[int, Option | None]], np.ndarray, np.ndarray]:
    """Every single-decision change from the current state (plus "no change" first) and its
    byte and KL deltas."""
    moves: list[tuple[int, Option | None]] = [(-1, None)]
    for index, decision in enumerate(state.decisions):
        moves += [(index, option) for option in decision.options if option != state.current[index]]
    d_bytes = np.array([0 if o is None else o.bytes - state.current[i].bytes for i, o in moves], dtype=np.float64)
    d_kl = np.array([0.0 if o is None else o.kl - state.current[i].kl for i, o in moves], dtype=np.float64)
    return moves, d_bytes, d_kl


def _improve(state: _State, *, max_bytes: int | None, max_kl: float | None) -> None:
    """Moves of one or two decisions at once, best first, while one improves the objective within
    the constraint: less KL (then fewer bytes) within `max_bytes`, or fewer bytes (then less KL)
    within `max_kl`. All pairs are scored at once (numpy; ~1300 moves on SmolLM2's 211 tensors);
    a move must gain more than float noise, so the loop ends."""
    eps = 1e-12 * max(1.0, abs(state.kl))
    for _ in range(10 * len(state.decisions) + 10):
        moves, d_bytes, d_kl = _moves(state)
        owner = np.array([i for i, _ in moves])
        pair_bytes = d_bytes[:, None] + d_bytes[None, :]
        pair_kl = d_kl[:, None] + d_kl[None, :]
        # a pair touches two different decisions (or one and "no change"), each pair once
        valid = np.triu(owner[:, None] != owner[None, :]) | (np.arange(len(moves))[:, None] == 0)
        np.fill_diagonal(valid, False)
        if max_bytes is not None:
            valid &= state.bytes + pair_bytes <= max_bytes
            primary, secondary = -pair_kl, -pair_bytes
        else:
            valid &= state.kl + pair_kl <= max_kl
            primary, secondary = -pair_bytes, -pair_kl
        best = _best_pair(valid, primary, secondary, eps if max_bytes is not None else 0.5)
        if best is None:
            return
        for index in best:
            if index:
                state.move(*moves[index])


def _best_pair(valid: np.ndarray, primary: np.ndarray, secondary: np.ndarray, tie: float) -> tuple[int, int] | None:
    """The valid pair with the largest primary gain above `tie`, else the largest secondary gain
    among pairs whose primary gain is within `tie` of zero; None when nothing gains."""
    score = np.where(valid, primary, -np.inf)
    flat = int(np.argmax(score))
    if score.flat[flat] > tie:
        return np.unravel_index(flat, score.shape)
    score = np.where(valid & (np.abs(primary) <= tie), secondary, -np.inf)
    flat = int(np.argmax(score))
    if score.flat[flat] > 1e-15:
        return np.unravel_index(flat, score.shape)
    return None
