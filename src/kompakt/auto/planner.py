"""Turn a target (kompakt.auto.target) and what is known about the model (ModelFacts, with
the phase-1 analysis) into recipes: the plan to run first and the back-offs to try when a
result crosses the quality floor. Every decision is written down as one line.

The rules (seed 9.2 / 9.3: choose methods for the target; gentle steps first; evaluate, adjust):
- size / bytes / speed: the gentlest storage format that reaches the factor (Q8_0 before Q4_0;
  compressed-tensors int8/int4 for families llama.cpp cannot run). 4-bit is AWQ + GPTQ on the
  export's own grid, so the GGUF holds exactly the values GPTQ chose. Generation on a CPU is
  memory-bound, so a speed factor is planned as the same factor in bytes (and measured).
- With per-tensor costs measured (GGUF families; kompakt.auto.mixed): each tensor's type by a
  knapsack, the lowest predicted KL within the factor's bytes (the fewest bytes within the
  floor when that is predicted past it), a looser allocation as back-off, then uniform Q8_0.
- Without them, when no format alone reaches the factor: remove whole layers (the ones whose removal costs
  the least KL in the analysis), heal with distillation, then quantize — but only when the
  analysis predicts the floor can still hold; otherwise the plan says why and keeps the
  largest factor that stays within the floor.
- params: the shape `kompakt search` measured best at the fraction (kompakt.auto.searched_shape;
  Minitron-style width pruning where the search cannot run), then distillation with the rest of
  the budget; back-off = half the cut by width.
- Back-off after a crossed floor: less pruning first, then higher precision (Q4_0 -> Q8_0).

Predictions are estimates from the analysis (kompakt.auto.predict); the run measures the real
numbers after every step and decides with those, and the report puts each attempt's predicted
KL and bytes beside the measured ones. Sizes are the bytes of the file export writes
(kompakt.auto.gguf_bytes); where the embedding holds most of them, the plan says so and what
it does about it (kompakt.auto.embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kompakt.errors import ConfigError
from kompakt.auto.embedding import beyond_layers, embedding_line
from kompakt.auto.facts import ModelFacts
from kompakt.auto.mixed import PREDICTION_MARGIN, allocations, awq_options, file_bytes, has_costs, mixed_steps, summary, fewest_bytes_within
from kompakt.auto.predict import quant_kl
from kompakt.ops.ggml_types import QUANT_TYPES
from kompakt.recipe.schema import DataSpec, Gates, Recipe, Step
from kompakt.auto.searched_shape import SearchedShape
from kompakt.auto.target import Target
from kompakt.train.estimate import flops_per_token
from kompakt.units import duration

# Distillation is assumed to win back about half of a structural cut's KL within a CPU budget.
HEAL_KEEPS = 0.5
# Seconds of a step ≈ forwards × calibration tokens / tokens-per-second (+ eval). The quant
# passes run layer by layer and never the output layer, so their forwards are decoder forwards
# (ModelFacts.calibration_tps): the constants measured against full forwards on SmolLM2 (awq 11,
# gptq 4, rtn 0.05), whose decoder is 79 % of a forward's multiply-adds, divided by 0.79.
COST_FORWARDS = {"quant.awq": 14.0, "quant.gptq": 5.0, "quant.rtn": 0.06, "prune.depth": 1.0, "prune.width": 1.0}
DECODER_ONLY = ("quant.awq", "quant.gptq", "quant.rtn")
# A distillation token costs (6N student fwd+bwd + 2N teacher fwd) / 2N = 4 forward tokens
# (kompakt.train.estimate; an upper bound for a pruned, smaller student).
TRAIN_COST = flops_per_token(1, 1) / flops_per_token(0, 1)
MIN_BLOCKS, MAX_BLOCKS = 8, 64
HEAL_MIN_TOKENS = 4096


@dataclass
class Attempt:
    """One recipe to try, what it is expected to give, and why it looks like this."""

    label: str
    steps: list[Step]
    size_factor: float
    params_kept: float
    predicted_kl: float | None
    seconds: float
    meets_target: bool
    predicted_bytes: int | None = None  # the exported file (GGUF; compressed-tensors estimate otherwise)

    def describe(self) -> str:
        """What this attempt runs, named from its steps (the label only adds that it is a back-off)."""
        runs = steps_text(self.steps)
        return f"back-off: {runs}" if self.label.startswith("back-off") else runs

    def to_dict(self) -> dict:
        return {
            "label": self.label, "steps": [s.to_dict() for s in self.steps], "size_factor": self.size_factor,
            "params_kept": self.params_kept, "predicted_kl": self.predicted_kl, "seconds": self.seconds,
            "meets_target": self.meets_target, "predicted_bytes": self.predicted_bytes,
        }  # fmt: skip


@dataclass
class Plan:
    target: Target
    facts: ModelFacts
    data: DataSpec
    budget_s: float | None
    attempts: list[Attempt] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    export_type: str | None = None  # GGUF type of the result (None: no GGUF for this family)

    def export_type_for(self, index: int) -> str | None:
        """The GGUF type of attempt `index`'s result (its own grid, so export writes it exactly)."""
        return None if self.export_type is None else _export_type(self.attempts[index], self.facts)

    def recipe(self, index: int = 0, model: str | None = None, seed: int = 0) -> Recipe:
        gates = Gates()  # the floor is judged by the planner on the finished attempt, not per step
        return Recipe(model=model, seed=seed, data=self.data, metrics=["ppl", "kl", "top1"], gates=gates,
                      steps=list(self.attempts[index].steps),
                      exports=[{"format": "gguf", "type": self.export_type_for(index)}] if self.export_type else [])  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """The plan saved in a run's plan.json (a rerun follows it instead of planning again)."""
        attempts = [
            Attempt(a["label"], [Step.from_dict(step) for step in a["steps"]], a["size_factor"], a["params_kept"],
                    a["predicted_kl"], a["seconds"], a["meets_target"], a.get("predicted_bytes"))
            for a in values["attempts"]
        ]  # fmt: skip
        return cls(Target(**values["target"]), ModelFacts(**values["facts"]), DataSpec(**values["data"]),
                   values["budget_s"], attempts, list(values["choices"]), values["export_type"])  # fmt: skip

    def to_dict(self) -> dict:
        return {
            "target": self.target.to_dict(), "budget_s": self.budget_s, "data": vars(self.data).copy(),
            "choices": list(self.choices), "attempts": [a.to_dict() for a in self.attempts],
            "export_type": self.export_type, "facts": self.facts.to_dict(),
        }  # fmt: skip


# --- step builders ----------------------------------------------------------------------------


def _step_detail(step: Step) -> str:
    """The one setting that says how much a step does ("" when none of the usual ones is set)."""
    config = step.config
    if config.get("tensor_types"):
        detail = f"per tensor ({len(config['tensor_types'])} typed, the rest {config['format']})"
    elif config.get("format"):
        detail = f"on the {config['format']} grid"
    elif config.get("bits"):
        detail = f"int{config['bits']}" + (f" g{config['group_size']}" if config.get("group_size") else "")
    elif config.get("count"):
        detail = f"{config['count']} layers"
    elif config.get("target_params"):
        detail = f"to {config['target_params']:.0%} of the parameters"
    elif config.get("tokens"):
        detail = f"{config['tokens']} tokens"
    else:
        detail = ""
    return detail


def steps_text(steps: list[Step]) -> str:
    """What a list of steps runs, in order; neighbours with the same setting share it:
    "prune.depth 3 layers → distill.kd 65536 tokens → quant.awq + quant.gptq on the q4_0 grid"."""
    groups: list[tuple[list[str], str]] = []
    for step in steps:
        detail = _step_detail(step)
        names = ["quant.awq", step.name] if step.config.get("awq") else [step.name]  # AWQ inside GPTQ
        if groups and detail and groups[-1][1] == detail:
            groups[-1][0].extend(names)
        else:
            groups.append((names, detail))
    return " → ".join(f"{' + '.join(names)} {detail}".strip() for names, detail in groups) or "no steps"


def _quant_steps(fmt: str, blocks: int, with_awq: bool) -> list[Step]:
    if fmt in ("q8_0", "int8"):
        config = {"format": "q8_0"} if fmt == "q8_0" else {"bits": 8, "group_size": None}
        return [Step("quant.rtn", config)]  # 8-bit rounding is near-lossless: no calibration needed
    config = {"format": "q4_0"} if fmt == "q4_0" else {"bits": 4, "group_size": 64, "symmetric": True}
    return [Step("quant.gptq", {**config, "max_blocks": blocks, **awq_options(blocks, with_awq)})]


def with_awq_of(steps: list[Step]) -> bool:
    return any(s.name == "quant.awq" or s.config.get("awq") for s in steps)


def _kd_step(tokens: int) -> Step | None:
    from kompakt.passes.base import registry

    if "distill.kd" not in registry():
        return None
    return Step("distill.kd", {"tokens": int(tokens)})


def _step_seconds(step: Step, facts: ModelFacts, data: DataSpec) -> float:
    tokens = data.calibration_blocks * data.block_len
    if step.name == "distill.kd":
        return step.config.get("tokens", 0) * TRAIN_COST / facts.forward_tps
    blocks = step.config.get("max_blocks") or data.calibration_blocks
    forwards = COST_FORWARDS.get(step.name, 2.0)
    tps = facts.calibration_tps if step.name in DECODER_ONLY else facts.forward_tps
    awq = step.config.get("awq") and _step_seconds(Step("quant.awq", {"max_blocks": step.config.get("awq_blocks")}), facts, data)
    return forwards * min(tokens, blocks * data.block_len) / tps + (awq or 0.0)


def eval_seconds(facts: ModelFacts, data: DataSpec) -> float:
    """One step's evaluation: the candidate over the evaluation tokens, scored against the
    original's cached top-k distributions (computed once per run), plus save/load."""
    return data.eval_tokens / facts.scoring_tps + 10


def attempt_seconds(steps: list[Step], facts: ModelFacts, data: DataSpec) -> float:
    return sum(_step_seconds(s, facts, data) + eval_seconds(facts, data) for s in steps)


# --- predictions ------------------------------------------------------------------------------


def _cheapest_layers(facts: ModelFacts, count: int) -> list[int]:
    scores = facts.block_influence  # what prune.depth's block_influence method ranks by
    if not scores:  # no analysis: the last layers but the final one (ShortGPT's usual finding)
        return list(range(facts.layers - 1 - count, facts.layers - 1))
    return sorted(range(facts.layers), key=lambda i: scores[i])[:count]


def _fmt_kl(value: float | None) -> str:
    return "unknown (no analysis)" if value is None else f"{value:.3f}"


# --- the plan ---------------------------------------------------------------------------------


def _data_for_budget(facts: ModelFacts, base: DataSpec, budget_s: float | None, choices: list[str]) -> DataSpec:
    """Calibration blocks: as many as the budget affords for AWQ + GPTQ (MIN..MAX_BLOCKS)."""
    data = DataSpec(**vars(base))
    if budget_s is None:
        return data
    per_block = (COST_FORWARDS["quant.awq"] + COST_FORWARDS["quant.gptq"]) * data.block_len / facts.calibration_tps
    affordable = int(0.5 * budget_s / per_block)
    blocks = max(MIN_BLOCKS, min(base.calibration_blocks, MAX_BLOCKS, affordable))
    if blocks != base.calibration_blocks:
        choices.append(
            f"calibration: {blocks} blocks of {data.block_len} tokens (what the {duration(budget_s)} budget "
            f"affords at {facts.calibration_tps:.0f} decoder tokens/s)"
        )
    data.calibration_blocks = blocks
    return data


def _quant_attempt(label: str, fmt: str, facts: ModelFacts, data: DataSpec, with_awq: bool, factor: float) -> Attempt:
    steps = _quant_steps(fmt, data.calibration_blocks, with_awq)
    size = facts.size_factor(fmt)
    return Attempt(label, steps, size, 1.0, quant_kl(facts, steps), attempt_seconds(steps, facts, data), size >= factor,
                   int(facts.fp16_bytes / size))  # fmt: skip


def plan_size(target: Target, facts: ModelFacts, data: DataSpec, budget_s: float | None, choices: list[str]) -> list[Attempt]:
    """Attempts for a size / bytes / speed factor, the most promising first, back-offs after."""
    factor = target.size_factor(facts.fp16_bytes) or target.speed or 1.0
    formats = facts.quant_formats
    sizes = ", ".join(f"{f} {facts.size_factor(f):.2f}x" for f in formats)
    choices.append(f"size factors of the storage formats for this model: {sizes} (vs {facts.fp16_bytes / 1e6:.0f} MB fp16; "
                   "the bytes of the file export writes, header included)")  # fmt: skip
    if has_costs(facts):
        return _mixed_attempts(target, factor, facts, data, budget_s, choices)
    embedding = embedding_line(facts, formats[-1])
    if embedding is not None:
        choices.append(embedding)
    reaching = [f for f in formats if facts.size_factor(f) >= factor]
    with_awq = _afford_awq(facts, data, budget_s, choices)
    if reaching:
        fmt = reaching[0]
        choices.append(f"{fmt}: the gentlest format that reaches {factor:g}x")
        attempts = [_quant_attempt(f"{fmt}", fmt, facts, data, with_awq, factor)]
        gentler = formats[: formats.index(fmt)]
        attempts += [_quant_attempt(f"back-off: {g}", g, facts, data, with_awq, factor) for g in gentler]
        return attempts
    fmt = formats[-1]
    quant_only = _quant_attempt(f"{fmt} only", fmt, facts, data, with_awq, factor)
    pruned = _prune_attempt(target, factor, fmt, facts, data, budget_s, with_awq, choices)
    gentler = [_quant_attempt(f"back-off: {g}", g, facts, data, with_awq, factor) for g in formats[:-1]]
    return ([pruned] if pruned is not None else []) + [quant_only] + gentler


def _mixed_attempts(target: Target, factor: float, facts: ModelFacts, data: DataSpec, budget_s: float | None,
                    choices: list[str]) -> list[Attempt]:  # fmt: skip
    """Per-tensor types by measurement (kompakt.auto.mixed), then the uniform Q8_0 back-off."""
    with_awq = _afford_awq(facts, data, budget_s, choices)
    method = "quant.awq+quant.gptq" if with_awq else "quant.gptq"
    attempts = []
    for label, allocation, meets in allocations(target, factor, facts, method, facts.format_bytes["q8_0"], choices, data):
        steps = mixed_steps(allocation, facts, data.calibration_blocks, with_awq)
        size = file_bytes(allocation, facts, steps, data)
        attempts.append(Attempt(label, steps, facts.fp16_bytes / size, 1.0, allocation.kl,
                                attempt_seconds(steps, facts, data), meets, size))  # fmt: skip
    choices.extend(facts.sensitivity_notes)
    return attempts + [_quant_attempt("back-off: q8_0", "q8_0", facts, data, with_awq, factor)]


def reallocated(plan: Plan, index: int, measured_kl: float) -> Attempt | None:
    """After mixed attempt `index` crossed the floor at `measured_kl`: the allocation for the
    floor with the prediction rescaled by what was measured (seed 9.3: evaluate, adjust), to run
    before the back-off planned up front; None when the attempt was not mixed, the floor is not
    a KL, or the new allocation is not between the attempt and that back-off in bytes."""
    attempt, facts = plan.attempts[index], plan.facts
    later = plan.attempts[index + 1] if index + 1 < len(plan.attempts) else None
    floor = plan.target.max_kl
    if not attempt.label.startswith(("mixed", "back-off: mixed")) or floor is None or not has_costs(facts):
        return None
    if not attempt.predicted_kl or measured_kl <= attempt.predicted_kl or later is None:
        return None
    if later.label.endswith("(re-allocated)"):  # a rerun following its saved plan: done already
        return None
    ratio = measured_kl / attempt.predicted_kl
    with_awq = with_awq_of(attempt.steps)
    method = "quant.awq+quant.gptq" if with_awq else "quant.gptq"
    allocation = fewest_bytes_within(facts, plan.data, method, PREDICTION_MARGIN * floor / ratio)
    steps = mixed_steps(allocation, facts, plan.data.calibration_blocks, with_awq)
    size = file_bytes(allocation, facts, steps, plan.data)
    if not (attempt.predicted_bytes or 0) < size < (later.predicted_bytes or 0):
        return None
    plan.choices.append(f"attempt {index + 1} measured KL {measured_kl:.3f} where {attempt.predicted_kl:.3f} was "
                        f"predicted ({ratio:.2f}x): re-allocated for the floor with that ratio: " + summary(allocation, facts))  # fmt: skip
    return Attempt(f"back-off: mixed {facts.fp16_bytes / size:.2f}x (re-allocated)", steps, facts.fp16_bytes / size,
                   1.0, allocation.kl, attempt_seconds(steps, facts, plan.data), False, size)  # fmt: skip


def _afford_awq(facts: ModelFacts, data: DataSpec, budget_s: float | None, choices: list[str]) -> bool:
    if budget_s is None:
        return True
    awq = _step_seconds(Step("quant.awq", {"max_blocks": min(data.calibration_blocks, 16)}), facts, data)
    if awq > 0.4 * budget_s:
        choices.append(f"AWQ skipped: ≈{duration(awq)} is more than 40% of the budget; GPTQ alone")
        return False
    return True


def _prune_attempt(target: Target, factor: float, fmt: str, facts: ModelFacts, data: DataSpec,
                   budget_s: float | None, with_awq: bool, choices: list[str]) -> Attempt | None:  # fmt: skip
    """Remove the cheapest layers so that `fmt` reaches the factor; None when the analysis
    predicts the floor cannot hold (the reason goes into `choices`)."""
    layer_total = sum(facts.layer_params)
    best = facts.size_factor(fmt)
    impossible = beyond_layers(facts, fmt, factor)
    if impossible is not None:
        choices.append(f"{impossible}; not attempted, keeping {fmt} alone ({best:.2f}x)")
        return None
    kept_fraction = 1 - (facts.format_bytes[fmt] - facts.fp16_bytes / factor) / facts.layer_bytes(fmt)
    drop = math.ceil((1 - kept_fraction) * facts.layers - 1e-9)
    if drop >= facts.layers // 2:
        choices.append(
            f"{factor:g}x needs removing {drop} of {facts.layers} layers on top of {fmt} ({best:.2f}x alone): "
            "not attempted, half the model would be gone"
        )
        return None
    layers = _cheapest_layers(facts, drop)
    kept = [i for i in range(facts.layers) if i not in layers]
    prune_kl = sum(facts.skip_kl[i] for i in layers) if facts.skip_kl else None
    quant = _quant_steps(fmt, data.calibration_blocks, with_awq)
    q_kl = quant_kl(facts, quant, kept)
    predicted = None if prune_kl is None or q_kl is None else prune_kl * HEAL_KEEPS + q_kl
    floor = target.max_kl
    what = (f"{factor:g}x needs {fmt} plus removing {drop} of {facts.layers} layers (lowest block influence: "
            f"{', '.join(map(str, sorted(layers)))})")  # fmt: skip
    if predicted is not None and floor is not None and predicted > floor:
        choices.append(
            f"{what}: not attempted — the analysis predicts KL ≈ {predicted:.3f} even after healing "
            f"(removal {prune_kl:.3f} × {HEAL_KEEPS} + {fmt} {q_kl:.3f}) > floor {floor:g}; "
            f"keeping {fmt} alone ({best:.2f}x)"
        )
        return None
    steps = [Step("prune.depth", {"count": drop, "method": "block_influence", "max_blocks": data.calibration_blocks})]
    spent = attempt_seconds(steps + quant, facts, data)
    heal_tokens = _heal_tokens(facts, data, budget_s, spent)
    kd = _kd_step(heal_tokens) if heal_tokens else None
    if kd is not None:
        steps.append(kd)
    choices.append(f"{what}: predicted KL {_fmt_kl(predicted)}; heal: "
                   + (f"distillation on {heal_tokens} tokens" if kd is not None else "none (no budget / pass)"))  # fmt: skip
    steps += quant
    kept_share = 1 - sum(facts.layer_params[i] for i in layers) / layer_total
    size = facts.size_factor(fmt, kept_share)
    return Attempt(f"prune {drop} layers + {fmt}", steps, size, 1 - sum(facts.layer_params[i] for i in layers) / facts.params,
                   predicted, attempt_seconds(steps, facts, data), True, int(facts.fp16_bytes / size))  # fmt: skip


def _heal_tokens(facts: ModelFacts, data: DataSpec, budget_s: float | None, spent: float) -> int:
    """Distillation tokens that fit the budget left after the other steps (a fixed 64k without a budget)."""
    if budget_s is None:
        return 65536
    left = 0.8 * budget_s - spent - eval_seconds(facts, data)
    tokens = int(left * facts.forward_tps / TRAIN_COST)
    return tokens if tokens >= HEAL_MIN_TOKENS else 0


def plan_params(target: Target, facts: ModelFacts, data: DataSpec, budget_s: float | None, choices: list[str],
                searched: SearchedShape | None = None) -> list[Attempt]:  # fmt: skip
    """The searched shape's cut (else width pruning to the parameter fraction), healed by
    distillation; back-off: half the cut by width."""
    attempts = []
    for label, keep in (("params", target.params), ("back-off: half the cut", (1 + target.params) / 2)):
        steps = [Step("prune.width", {"target_params": round(keep, 4), "max_blocks": data.calibration_blocks})]
        if searched is not None and label == "params":
            steps, keep = list(searched.steps), searched.params_fraction
        spent = attempt_seconds(steps, facts, data)
        share = (budget_s / 2) if (budget_s and label != "params") else budget_s
        tokens = _heal_tokens(facts, data, share, spent)
        kd = _kd_step(tokens) if tokens else None
        steps += [kd] if kd is not None else []
        attempts.append(Attempt(f"{label} {keep:.2f}", steps, 1 / keep, keep, None,
                                attempt_seconds(steps, facts, data), label == "params"))  # fmt: skip
    healed = "distillation from the original" if attempts[0].steps[-1].name == "distill.kd" else "no healing (no budget)"
    if searched is not None:
        choices.append(searched.choice(target) + f"; that cut, then {healed}")
    else:
        choices.append(f"params={target.params:g}: Minitron width pruning (MLP channels, then hidden) to "
                       f"{target.params:.0%} of the parameters, then {healed}")  # fmt: skip
    return attempts


def make_plan(target: Target, facts: ModelFacts, data: DataSpec, budget_s: float | None, *, enforce: bool = True,
              searched: SearchedShape | None = None) -> Plan:  # fmt: skip
    """The plan for `target`. With `enforce`, raises ConfigError when the budget cannot hold even
    its first step; without (work already done), plans the smallest steps and says so. `searched`:
    the shape a params= search chose (kompakt.auto.searched_shape), planned instead of the width rule."""
    choices: list[str] = []
    if budget_s is not None and not enforce and budget_s < 60:
        choices.append(f"the budget is nearly spent ({duration(budget_s)} left after the analysis): smallest steps")
        budget_s = 60.0
    data = _data_for_budget(facts, data, budget_s, choices)
    if target.goal == "speed":
        choices.append(f"speed={target.speed:g}x: generation on a CPU is memory-bound, so planned as {target.speed:g}x fewer bytes")
    if target.goal == "params":
        attempts = plan_params(target, facts, data, budget_s, choices, searched)
    else:
        attempts = plan_size(target, facts, data, budget_s, choices)
    cheapest = min(attempts, key=lambda a: a.seconds)
    if enforce and budget_s is not None and _first_step_seconds(cheapest, facts, data) > budget_s:
        raise ConfigError(
            f"--budget {duration(budget_s)} is too small to run even the first step "
            f"(≈{duration(_first_step_seconds(cheapest, facts, data))} on this machine); give a larger budget"
        )
    fmt = _export_type(attempts[0], facts)
    plan = Plan(target, facts, data, budget_s, attempts, choices, fmt)
    if not attempts[0].meets_target:
        choices.append(f"the target is not reachable within the floor by this plan: best {attempts[0].size_factor:.2f}x")
    return plan


def _first_step_seconds(attempt: Attempt, facts: ModelFacts, data: DataSpec) -> float:
    return attempt_seconds(attempt.steps[:1], facts, data)


def _export_type(attempt: Attempt, facts: ModelFacts) -> str | None:
    if not facts.gguf:
        return None
    for step in attempt.steps:
        if step.config.get("format") in QUANT_TYPES:
            return step.config["format"]  # with tensor_types: the file type; each tensor's own is recorded
    return "f16"
