"""`compress --target` for sentence encoders: what the target means, what is reachable, and the
attempts (recipes) that get there. Pure planning: no model runs here.

What the numbers say (all-MiniLM-L6-v2: 22.7 M parameters, of which the word embeddings hold
11.7 M = 30522 x 384, position and type embeddings and the pooler 0.35 M more, the 6 layers
1.77 M each): removing layers (DistilBERT, TinyBERT, MiniLM students), heads or FFN channels
never touches the embeddings, so `params=` is counted over all parameters, as DistilBERT
counts its "40 % fewer", and a target below the non-layer share plus one layer is refused with
the reachable minimum rather than silently read as "a share of the layers". Cutting the
embedding width changes the embedding dimension (every stored vector would have to be
recomputed): never done. Trimming the vocabulary to the tokens the user's text uses
(prune.vocab: WordPiece keeps single characters, so an unseen word is split into smaller
pieces, not [UNK]) is the one way below that share: planned only when the target cannot be
met by layers alone *and* --data names the text the model will embed (trimmed to its training
part, so the held-out score shows the cost on unseen words). It runs last, after distill.kd,
so the teacher and the student share a vocabulary while training; text made of kept tokens
embeds exactly as before the trim. Measured (all-MiniLM-L6-v2, params=0.5 with WikiText-2
validation as --data, 3 layers + a short KD, under load): the trim to 13199 tokens took the
held-out cosine from 0.863 to 0.776 — WikiText's held-out end is rich in rare words its
training part lacks; trim with the text the model will embed.

Goals:
- params=P: keep n' = the most layers whose parameters fit P (at least one), then distil; when
  no layer count fits and --data is given, the same with the trimmed vocabulary's parameters.
- speed=S: an encoder's compute is its layers (the embedding lookup is free), and the run
  delivers int8 ONNX, which runs the original G x its fp32 ONNX (G measured at planning,
  kompakt.auto.encoder_int8; all-MiniLM-L6-v2 on 2 cores: about 2.1x at cosine 0.993). So S x
  faster than the original's fp32 ONNX means keeping k of n layers with n/k x G nearest S; when
  G alone reaches S, no layer goes and nothing is trained (the original as int8 ONNX). G is not
  counted (k = n/S) without onnxruntime, or when the int8 graph's cosine is below the floor.
  Measured afterwards: sentences/s at batch 32, both files in onnxruntime.
- size= / bytes=: refused with what to do instead (an int8 ONNX export, params=, speed=).

Layers to drop: the contiguous block whose input and output are closest in angle on
calibration sentences (prune.depth method angular; Gromov et al. 2024). Measured on
all-MiniLM-L6-v2 (200 WikiText-2 test sentences, before any healing): keeping layers 0, 4, 5
(the block 1-3 removed) gives mean cosine 0.73 to the original, DistilBERT's every other layer
(0, 2, 4; recipes/distilbert-halve.yaml) 0.33 — a sentence-embedding model keeps what its
training tuned in its last layers (after 200 distillation steps: 0.900 vs 0.731). Then
distill.kd on the sentence cosine plus MiniLM v2's last-layer q/k/v relations: chosen on 500
held-back WikiText-2 validation sentences after 800 steps (bench/encoder_objectives.py: cosine
0.919 / recall@10 0.682 with them, 0.915 / 0.677 without; token-level hidden-state MSE 0.918;
the in-batch similarity-matrix and CompRess neighbour losses lowered the cosine), then confirmed
in 30 CPU-minutes on the test text (bench/encoders.py, 3 layers at lr 2.5e-4: 0.937 / 0.688 with
them, 0.930 / 0.672 without, though the cosine alone, its teacher embeddings cached, ran 6358
steps to their 3482). Its peak lr is in proportion to the share of layers removed (_kd_lr): after 800 steps
(bench/encoder_depth.py, 500 held-back WikiText-2 validation sentences) keeping 5 of 6 layers
scored cosine 0.970 at lr 1e-4, 0.965 at 2.5e-4 and 0.955 at 5e-4; keeping 4, 0.936 / 0.938 /
0.932; keeping 3, 0.911 / 0.916 / 0.914 (and 0.901 at 1e-3). A student close to the teacher
needs small steps; one that starts far needs larger ones. Floor: mean cosine
to the original's embeddings on held-out sentences (`min-cosine`, default 0.95); KL and
perplexity floors do not apply to encoders and are refused. Back-off when the floor is
crossed: keep one more layer, up to keeping all but one (all of them, int8 only, when the int8
gain is counted). The floor is judged on what is delivered: the int8 graph's embeddings when
the run writes one (kompakt.auto.encoder).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kompakt.auto.target import Target
from kompakt.errors import ConfigError

DEFAULT_TARGET = "speed=2x,min-cosine=0.95"
DEFAULT_MIN_COSINE = 0.95
KD_SENTENCES = 20000  # without a budget: the recipe's distillation (recipes/distilbert-halve.yaml)
MIN_KD_SENTENCES = 512
KD_CONFIG = {"batch_size": 32, "warmup": 0.1, "cosine_weight": 1.0, "relation_weight": 1.0}
KD_LR_HALVED = 2.5e-4  # peak lr when half the layers go; scaled by the share removed (_kd_lr)
# A training sentence costs one teacher forward + a student forward and backward (≈ 3 forwards of
# the student's layers): in teacher-forward units, 1 + 3 · kept / layers.
BUDGET_SHARE = 0.8  # of the budget left for distillation after pruning and evaluation


@dataclass
class EncoderFacts:
    """Sizes of an encoder, from its modules (no data needed), and its measured speed."""

    name: str
    fingerprint: str
    params: int
    layers: int
    layer_params: list[int]
    sentences_per_s: float  # embed() at batch 32 on --data's training sentences (else short ones), this machine
    embed_rows: int = 0  # word-embedding rows and width: what prune.vocab can shrink
    embed_width: int = 0
    trimmed_rows: int | None = None  # rows prune.vocab keeps on --data's training sentences; None: no data / not trimmable
    trim_note: str = ""  # why trimming is not available, when it is not
    # the original as int8 ONNX against its fp32 ONNX (kompakt.auto.encoder_int8; speed= targets only)
    int8_speedup: float | None = None
    int8_cosine: float | None = None
    int8_note: str = ""  # why it was not measured

    @property
    def trim_saves(self) -> int:
        """Parameters the vocabulary trim removes (0 when it is not available)."""
        return 0 if self.trimmed_rows is None else (self.embed_rows - self.trimmed_rows) * self.embed_width

    @property
    def fixed_params(self) -> int:
        """Parameters outside the layers (embeddings, pooler): what depth or width pruning keeps."""
        return self.params - sum(self.layer_params)

    def params_with(self, kept_layers: int, trim: bool = False) -> int:
        return self.fixed_params + sum(sorted(self.layer_params)[:kept_layers]) - (self.trim_saves if trim else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EncoderAttempt:
    label: str
    kept_layers: int
    steps: list  # kompakt.recipe.schema.Step
    params_kept: float
    seconds: float | None = None
    trim: bool = False  # ends with prune.vocab

    def to_dict(self) -> dict:
        return {"label": self.label, "kept_layers": self.kept_layers, "params_kept": self.params_kept, "trim": self.trim,
                "seconds": self.seconds, "steps": [s.to_dict() for s in self.steps]}  # fmt: skip


@dataclass
class EncoderPlan:
    target: Target
    facts: EncoderFacts
    budget_s: float | None
    attempts: list[EncoderAttempt] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    data: str | None = None  # --data: training sentences, their last 10 % held out for scoring

    def recipe(self, index: int = 0, model: str | None = None, seed: int = 0):
        """Attempt `index` as a recipe: scored by embedding fidelity and speed, no gates (the
        floor is judged on the attempt's last step)."""
        from kompakt.recipe.schema import DataSpec, Gates, Recipe

        return Recipe(model=model or self.facts.name, seed=seed, data=DataSpec(calibration=self.data),
                      metrics=["cosine", "speed"], gates=Gates(), steps=list(self.attempts[index].steps))  # fmt: skip

    def to_dict(self) -> dict:
        return {"kind": "encoder", "data": self.data, "target": self.target.to_dict(), "budget_s": self.budget_s,
                "facts": self.facts.to_dict(), "choices": list(self.choices),
                "attempts": [a.to_dict() for a in self.attempts]}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> EncoderPlan:
        """The plan saved in a run's plan.json: a rerun (or the run after --plan-only) follows it
        instead of measuring the speed again and sizing distillation anew."""
        from kompakt.recipe.schema import Step

        attempts = [EncoderAttempt(a["label"], a["kept_layers"], [Step.from_dict(step) for step in a["steps"]],
                                   a["params_kept"], a["seconds"], a["trim"]) for a in values["attempts"]]  # fmt: skip
        return cls(Target(**values["target"]), EncoderFacts(**values["facts"]), values["budget_s"], attempts,
                   list(values["choices"]), values["data"])  # fmt: skip


def encoder_target(text: str | None) -> Target:
    """The target for an encoder: params= or speed= with a min-cosine floor (default 0.95)."""
    from kompakt.auto.target import parse_target

    given = text is not None
    target = parse_target(text or DEFAULT_TARGET)
    if given and ("max-kl" in text or "max-ppl-ratio" in text):
        raise ConfigError("--target max-kl / max-ppl-ratio measure next-token predictions, which a sentence encoder "
                          "has none of; give its floor as min-cosine=0.95 (mean cosine to the original's embeddings)")  # fmt: skip
    if target.goal == "size" and given and ("size=" in text or "bytes=" in text):
        raise ConfigError("--target size= / bytes= is not planned for sentence encoders; give params=0.8 or speed=2x "
                          "(fewer layers), or shrink the file: kompakt export DIR --format onnx --type int8")  # fmt: skip
    floor = target.min_cosine if target.min_cosine is not None else DEFAULT_MIN_COSINE
    target = dataclasses.replace(target, max_kl=None, max_ppl_ratio=None, min_cosine=floor)
    if target.goal == "size":  # a floor alone: parse_target aimed it at size=4x; encoders aim at speed=2x
        target = dataclasses.replace(target, size=None, speed=2.0)
    return target


def int8_gain(target: Target, facts: EncoderFacts) -> float:
    """The speed-up the delivered int8 ONNX adds, as the plan counts it: the measured one when its
    cosine stays within the floor, else 1 (layers alone)."""
    counted = facts.int8_speedup is not None and facts.int8_cosine is not None
    return facts.int8_speedup if counted and facts.int8_cosine >= target.min_cosine else 1.0


def _int8_why(target: Target, facts: EncoderFacts) -> str:
    if facts.int8_speedup is None:
        return f"the int8 ONNX speed-up is not counted: {facts.int8_note or 'not measured'}"
    measured = (f"onnxruntime's dynamic int8 runs the original {facts.int8_speedup:.2f}x its fp32 ONNX at batch 32, "
                f"mean cosine {facts.int8_cosine:.3f} (measured now, on this machine)")  # fmt: skip
    if int8_gain(target, facts) == 1.0:
        return f"{measured}: below the floor, so only layers count for speed"
    return f"{measured}; the run delivers int8 ONNX, so the layers make up the rest"


def _speed_layers(target: Target, facts: EncoderFacts) -> tuple[int, str]:
    """(layers to keep, why): an encoder's compute is its layers (the embedding lookup is free), so
    keeping k of n runs n/k faster, times the int8 graph's gain when counted. Of the two whole
    counts around the exact one, the one whose speed is nearer the target (as a ratio)."""
    n, gain = facts.layers, int8_gain(target, facts)
    exact = n * gain / target.speed
    keep = min({max(1, math.floor(exact + 1e-9)), max(1, math.ceil(exact - 1e-9))},
               key=lambda k: (abs(math.log(n * gain / k / target.speed)), -k))  # fmt: skip
    if target.speed > n * gain * (1 + 1e-9) or (keep >= n and gain == 1.0):
        reach = f"{n * gain:.2f}" if gain > 1.0 else f"{n}"
        raise ConfigError(f"--target speed={target.speed:g}x on {n} layers is out of reach; give a factor in "
                          f"(1, {reach}]")  # fmt: skip
    keep = min(keep, n)
    what = "keep all, no training: the original as int8 ONNX" if keep == n else f"keep {keep} of {n}"
    return keep, (f"speed={target.speed:g}x: an encoder's compute is its layers, so {what} "
                  f"(≈{n / keep * gain:.2f}x; measured after the run)")  # fmt: skip


def _layers_for(target: Target, facts: EncoderFacts) -> tuple[int, bool, str]:
    """(layers to keep, whether the vocabulary is trimmed, why) for the target's goal;
    ConfigError when it is out of reach."""
    n = facts.layers
    if target.goal == "speed":
        keep, why = _speed_layers(target, facts)
        return keep, False, why
    wanted = target.params * facts.params
    for trim in (False, True) if facts.trimmed_rows is not None else (False,):
        fitting = [k for k in range(1, n) if facts.params_with(k, trim) <= wanted]
        if fitting:
            keep = max(fitting)
            return keep, trim, _params_why(target, facts, keep, trim)
    raise ConfigError(_out_of_reach(target, facts))


def _params_why(target: Target, facts: EncoderFacts, keep: int, trim: bool) -> str:
    share = facts.params_with(keep, trim) / facts.params
    head = (f"params={target.params:g} of {facts.params / 1e6:.1f} M (all parameters, as DistilBERT counts): keep "
            f"{keep} of {facts.layers} layers")  # fmt: skip
    if not trim:
        return f"{head} = {share:.1%}; the embeddings ({facts.fixed_params / facts.params:.0%}) stay"
    return (f"{head} and trim the vocabulary to the {facts.trimmed_rows} tokens --data's training sentences use "
            f"(prune.vocab, of {facts.embed_rows}; last, after distillation) = {share:.1%}: layers alone cannot "
            f"reach it (the embeddings hold {facts.fixed_params / facts.params:.0%}); words outside that text are split "
            "into smaller pieces, which the held-out score after prune.vocab shows")  # fmt: skip


def _out_of_reach(target: Target, facts: EncoderFacts) -> str:
    n = facts.layers
    smallest = facts.params_with(1) / facts.params
    halve = facts.params_with(n // 2) / facts.params
    if facts.trimmed_rows is not None:
        trimmed = facts.params_with(1, True) / facts.params
        how = (f"with the vocabulary trimmed to --data's {facts.trimmed_rows} tokens the smallest is "
               f"params={math.ceil(trimmed * 100) / 100:g}")  # fmt: skip
    else:
        how = ("trimming the vocabulary to the text you will embed goes lower: pass it as --data"
               if not facts.trim_note else f"the vocabulary cannot be trimmed ({facts.trim_note})")  # fmt: skip
    return (f"--target params={target.params:g} is out of reach for {facts.name}: its embeddings and pooler hold "
            f"{facts.fixed_params / 1e6:.1f} M of its {facts.params / 1e6:.1f} M parameters "
            f"({facts.fixed_params / facts.params:.0%}), which removing layers, heads or FFN channels leaves in place; "
            f"the smallest reachable by layers is params={math.ceil(smallest * 100) / 100:g} (1 of {n} layers), halving "
            f"the layers as DistilBERT is params={math.ceil(halve * 100) / 100:g}; {how}")  # fmt: skip


def _prune_step(kept: int, n: int):
    from kompakt.recipe.schema import Step

    return Step("prune.depth", {"count": n - kept, "method": "angular"})


def _kd_sentences(facts: EncoderFacts, kept: int, budget_s: float | None) -> int:
    if budget_s is None:
        return KD_SENTENCES
    cost = (1 + 3 * kept / facts.layers) / facts.sentences_per_s  # seconds per training sentence
    return int(BUDGET_SHARE * budget_s / cost)


def _kd_lr(kept: int, layers: int) -> float:
    """distill.kd's peak lr, in proportion to the share of layers removed: 2.5e-4 for half of
    them, 8.33e-5 for one of six. The step size a halved student needs pulls one that starts
    close to the teacher away from what the teacher learned (module docstring)."""
    return float(f"{KD_LR_HALVED * 2 * (layers - kept) / layers:.3g}")


def _attempt(label: str, kept: int, facts: EncoderFacts, budget_s: float | None, choices: list[str],
             trim: bool = False) -> EncoderAttempt:  # fmt: skip
    from kompakt.recipe.schema import Step

    if kept == facts.layers:  # the int8 graph alone: nothing to remove, nothing to heal
        return EncoderAttempt(label, kept, [], facts.params_with(kept) / facts.params, 0.0 if budget_s else None)
    sentences = _kd_sentences(facts, kept, budget_s)
    steps = [_prune_step(kept, facts.layers)]
    if sentences >= MIN_KD_SENTENCES:
        steps.append(Step("distill.kd", {"sentences": sentences, **KD_CONFIG, "lr": _kd_lr(kept, facts.layers)}))
    else:
        choices.append(f"{label}: no distillation — the budget affords {sentences} sentences (< {MIN_KD_SENTENCES})")
    if trim:  # last: distillation needs the teacher's vocabulary; the run's training sentences are the corpus
        steps.append(Step("prune.vocab", {}))
    seconds = None if budget_s is None else sentences * (1 + 3 * kept / facts.layers) / facts.sentences_per_s
    return EncoderAttempt(label, kept, steps, facts.params_with(kept, trim) / facts.params, seconds, trim)


def _kd_config(attempt: EncoderAttempt) -> dict:
    return next((step.config for step in attempt.steps if step.name == "distill.kd"), {})


def _kd_phrase(config: dict) -> str:
    """'2898 sentences (91 steps of 32)': the steps distill.kd will run for the planned sentences."""
    from kompakt.passes.encoder_training import sentence_steps

    if not config:
        return "no distillation"
    steps = sentence_steps(config["sentences"], config["batch_size"], config.get("grad_accum", 1))
    return f"{config['sentences']} sentences ({steps} steps of {config['batch_size']})"


def _label(kept: int, layers: int) -> str:
    return f"keep {kept} of {layers} layers" if kept < layers else f"keep all {layers} layers (int8 ONNX only)"


def make_encoder_plan(target: Target, facts: EncoderFacts, budget_s: float | None, data: str | None = None) -> EncoderPlan:
    """The attempts for `target`: the cut it asks for first, then one more layer kept each time."""
    choices: list[str] = []
    keep, trim, why = _layers_for(target, facts)
    choices.append(why)
    choices.append(f"floor: mean cosine ≥ {target.min_cosine:g} to the original's embeddings of held-out sentences")
    if target.goal == "speed":
        choices.append(_int8_why(target, facts))
    share = None if budget_s is None else budget_s / 2  # the first attempt and its back-offs share the budget
    attempts = [_attempt(_label(keep, facts.layers), keep, facts, share, choices, trim)]
    gain = int8_gain(target, facts) if target.goal == "speed" else 1.0
    for more in range(keep + 1, facts.layers + (gain > 1.0)):  # all layers kept only when int8 adds speed
        if target.goal == "speed" and facts.layers * gain / more < 1.0 + 1e-9:
            break
        attempts.append(_attempt("back-off: " + _label(more, facts.layers), more, facts,
                                 None if share is None else share / 2, choices, trim))  # fmt: skip
        if len(attempts) == 3:
            break
    if any(a.steps for a in attempts):
        choices.append("layers removed as the contiguous block closest in angle on calibration sentences (prune.depth "
                       "angular: kept the last layers, cosine 0.73 before healing on all-MiniLM-L6-v2 where DistilBERT's "
                       "every other layer gives 0.33), then distill.kd on 1 - cosine of the sentence embeddings and MiniLM "
                       "v2's last-layer q/k/v relations, the peak lr in proportion to the share of layers removed")  # fmt: skip
    if budget_s is not None and any(a.steps for a in attempts):
        choices.append(f"distillation sized for the {budget_s / 60:.0f} min budget at {facts.sentences_per_s:.0f} "
                       "teacher sentences/s: " + ", ".join(f"{a.label}: {_kd_phrase(_kd_config(a))}"
                                                           for a in attempts))  # fmt: skip
    return EncoderPlan(target, facts, budget_s, attempts, choices, data)
