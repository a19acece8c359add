"""`kompakt compress ENCODER --target ...`: plan (kompakt.auto.encoder_plan), run the attempts as
recipes until one ends within the cosine floor, link the result, report. An attempt within the
floor is exported as int8 ONNX at once and judged again on that graph's embeddings, so the
floor holds for what is delivered; the attempt that keeps every layer (when the int8 graph
alone reaches a speed= target) runs no recipe: its final is the original, saved.

Run directory (the decoder layout where it applies)::

    out/auto.json          the model fingerprint and target this directory belongs to
    out/plan.json          target, facts, every choice in one line, the attempts (a rerun with the
                           same budget and --data, or the run after --plan-only, follows it)
    out/recipe.yaml        the recipe of the attempt that produced the result (edit and rerun it);
                           none when it ran no recipe
    out/attempts/N/        one recipe run per attempt (steps/, lineage.jsonl, report.md; only
                           final/ for the attempt without steps)
    out/reference/         the original's embeddings of the held-out sentences (computed once)
    out/final -> attempts/N/final   a HF + sentence-transformers directory
    out/export/onnx-int8/  the final model as int8 ONNX, checked in onnxruntime (kompakt.auto.encoder_deliver;
                           the report's table compares it with the original's ONNX in onnxruntime);
                           each attempt within the floor writes it anew
    out/exports.json       its path and check, or why none was written
    out/outcome.json, report.md / report.html / report.json

Each step is scored on held-out sentences (kompakt.recipe.encoder_measure): the last 10 % of
`--data`'s sentences, or kompakt's shipped held-out set when no data is given (training
sentences are then split from text the embedded SmolLM2 writes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kompakt.atomic import atomic_symlink, reporting_errors, write_text
from kompakt.auto.encoder_deliver import Delivery, deliver
from kompakt.auto.encoder_plan import EncoderFacts, EncoderPlan, encoder_target, make_encoder_plan
from kompakt.auto.outdir import check_out, default_out
from kompakt.auto.target import parse_budget
from kompakt.errors import DataError
from kompakt.rundir.layout import AUTO_FILE, REFERENCE_DIR

logger = logging.getLogger(__name__)

# Timing sentences for the speed facts (the distillation budget, the int8 gain) when there is no
# --data: short, varied. With --data, a sample of its own training sentences is timed: WikiText's
# average 27 tokens on all-MiniLM-L6-v2 against these 12, and a sentence's cost grows with its
# tokens. The budget times 64 (training batches are random draws, padded like them); the int8
# gain 512: batches of 32 are padded to their longest sentence, and two batches of a random 64
# pad far more than the many length-sorted batches the report times the delivered graph on. The
# gain measured on 64 WikiText sentences was 1.82-1.86x, on 512 2.12x, on the run's 799 held-out
# sentences 2.08x.
_TIMING_SENTENCES = 64
_INT8_TIMING_SENTENCES = 512
_TIMING = [f"Sentence {i} says something about {topic} in plain words." for i, topic in enumerate(
    ("rivers", "music", "trains", "bread", "stars", "chess", "rain", "cities") * 8)]  # fmt: skip


@dataclass
class EncoderResult:
    """What `compress_encoder` produced (the fields `kompakt compress` prints, as AutoResult)."""

    out_dir: Path
    plan: EncoderPlan
    final: Path | None = None
    attempt: int | None = None
    outcomes: list[dict] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)  # the final step is itself a HF + ST directory
    report: Path | None = None
    wall_s: float = 0.0


def is_encoder_source(model: str | None) -> bool:
    """Whether `model` (an embedded name or a local directory) is a sentence encoder, read from
    its config.json without loading weights."""
    from kompakt.model.arch import is_encoder_family
    from kompakt.model.embedded import EMBEDDED_MODELS, embedded_hf_dir

    if model is None:
        return False
    directory = embedded_hf_dir(str(model)) if str(model).lower() in EMBEDDED_MODELS else Path(model).expanduser()
    config = directory / "config.json" if directory is not None else None
    if config is None or not config.is_file():
        return False
    try:
        return is_encoder_family(json.loads(config.read_text()))
    except (OSError, ValueError):
        return False


def encoder_facts(loaded, measure_speed: bool = True, data: str | None = None,
                  timing_data: str | None = None, int8: bool = False) -> EncoderFacts:  # fmt: skip
    """Parameter counts per layer and the rest; sentences/s only when a budget needs it (0 otherwise),
    timed on `timing_data`'s training sentences when given; with `data`, the vocabulary rows
    prune.vocab would keep on its training sentences; with `int8`, what the original's int8
    ONNX gains over its fp32 ONNX (kompakt.auto.encoder_int8), on more of those sentences."""
    from kompakt.auto.encoder_int8 import measure_int8_gain
    from kompakt.model.arch import arch_for, decoder_layers, get_submodule
    from kompakt.recipe.encoder_measure import sentences_per_s

    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(loaded.model)]
    rows, width = get_submodule(loaded.model, arch_for(loaded.model).embed).weight.shape
    trimmed, note = _trimmed_rows(loaded, data)
    timed = int8 or measure_speed
    training = _training_sentences(timing_data) if timing_data is not None and timed else []  # read once for both
    gain = measure_int8_gain(loaded, _timing(training, _INT8_TIMING_SENTENCES)) if int8 else None
    return EncoderFacts(name=loaded.name, fingerprint=loaded.fingerprint(), params=loaded.num_parameters(),
                        layers=len(layer_params), layer_params=layer_params,
                        sentences_per_s=sentences_per_s(loaded, _timing(training, _TIMING_SENTENCES)) if measure_speed else 0.0,
                        embed_rows=int(rows), embed_width=int(width), trimmed_rows=trimmed, trim_note=note,
                        int8_speedup=gain.speedup if gain else None,
                        int8_cosine=gain.cosine if gain else None,
                        int8_note=gain.note if gain else "")  # fmt: skip


def _training_sentences(data: str) -> list[str]:
    """--data's sentences without the held-out end, as the run splits them (kompakt.recipe.rundata)."""
    from kompakt.data.sentences import read_sentences
    from kompakt.recipe.rundata import HELDOUT_FRACTION

    sentences = read_sentences(data)
    return sentences[: len(sentences) - max(1, round(len(sentences) * HELDOUT_FRACTION))]


def _timing(training: list[str], count: int) -> list[str]:
    """The sentences a speed fact is timed on: `count` of --data's training sentences, else _TIMING."""
    from kompakt.data.sentences import sample_sentences
    from kompakt.recipe.encoder_measure import SPEED_BATCH

    return sample_sentences(training, count) if len(training) >= SPEED_BATCH else _TIMING


def _trimmed_rows(loaded, data: str | None) -> tuple[int | None, str]:
    """(rows prune.vocab keeps on the training part of --data's sentences, or None; why not)."""
    from kompakt.errors import UnsupportedArchitectureError
    from kompakt.passes.prune_vocab import encoder_rows_kept

    if data is None:
        return None, ""
    try:
        return encoder_rows_kept(loaded, _training_sentences(data)), ""
    except UnsupportedArchitectureError as error:
        return None, str(error)


def _saved_plan(out_dir: Path, fingerprint: str, budget_s: float | None, data: str | None) -> EncoderPlan | None:
    """The plan.json of an earlier run (or --plan-only) in `out_dir` for the same model, budget
    and data, else None. Planning measures sentences/s, which moves with the machine's load, and
    sizes distillation from it: planning again would run other steps than the plan shown (and
    redo finished ones). The target was checked by check_out."""
    saved = out_dir / "plan.json"
    if not saved.is_file():
        return None
    try:
        plan = EncoderPlan.from_dict(json.loads(saved.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("%s is unreadable (%s); planning again", saved, error)
        return None
    if (plan.facts.fingerprint, plan.budget_s, plan.data) != (fingerprint, budget_s, data):
        logger.info("%s was planned for another budget or --data; planning again", saved)
        return None
    logger.info("following the plan saved in %s", saved)
    return plan


def _emit(on_event, kind: str, values: dict) -> None:
    if on_event is not None:
        on_event(kind, values)


def _held_out(plan: EncoderPlan, original, out_dir: Path, seed: int):
    """The run's held-out sentences and the original's embeddings of them, as every step scores
    against (kompakt.recipe.encoder_measure; cached in out/reference)."""
    from kompakt.recipe.rundata import RunData, measurer_for

    return measurer_for(original, RunData(plan.recipe(0).data, original, seed), [], out_dir / REFERENCE_DIR)


def _run_one(plan: EncoderPlan, index: int, out_dir: Path, original, model: str, seed: int, on_step):
    """(final directory, its metrics) of attempt `index`: its recipe run, or for the int8-only
    attempt (no steps) the original saved as it is, at cosine 1 before its int8 export."""
    from kompakt.model.save import save_model
    from kompakt.recipe.runner import run_recipe

    run_dir = out_dir / "attempts" / str(index + 1)
    if plan.attempts[index].steps:
        run = run_recipe(plan.recipe(index, model, seed), run_dir, on_step=on_step, reference_dir=out_dir / REFERENCE_DIR)
        return run.final, run.records[-1]["metrics"]
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        save_model(original, final)
    return final, {"cosine_mean": 1.0}


def _judge(attempt, outcome: dict, out_dir: Path, held_out, floor: float, on_event):
    """(the cosine the floor is judged on, what it is, the int8 Delivery or None). An attempt
    within the floor in fp32 is exported as int8 ONNX at once and judged on that graph instead."""
    cosine, judged = outcome["metrics"].get("cosine_mean"), "mean cosine"
    if cosine is None or cosine < floor:
        return cosine, judged, None
    _emit(on_event, "int8", {"attempt": outcome["attempt"]})
    delivery = deliver(Path(outcome["final"]), out_dir, held_out)
    if delivery.fidelity is not None:
        outcome["int8"] = delivery.fidelity
        if not attempt.steps:  # the original itself: what it delivers is all there is to score
            outcome["metrics"] = delivery.fidelity
        cosine, judged = delivery.fidelity["cosine_mean"], "int8 ONNX mean cosine"
    return cosine, judged, delivery


def _run_attempts(plan: EncoderPlan, out_dir: Path, original, held_out, model: str, seed: int, on_step, on_event):
    """(outcomes, index of the kept attempt or None, its final directory or None, its Delivery or
    None): the attempts in order until one is within the floor as delivered (_judge)."""
    floor = plan.target.min_cosine
    outcomes, best, delivered = [], None, None
    for index, attempt in enumerate(plan.attempts):
        _emit(on_event, "attempt", {"index": index + 1, "label": attempt.label, "seconds": attempt.seconds or 0})
        final, metrics = _run_one(plan, index, out_dir, original, model, seed, on_step)
        outcome = {"attempt": index + 1, "label": attempt.label, "run_dir": str(out_dir / "attempts" / str(index + 1)),
                   "final": str(final), "metrics": metrics}  # fmt: skip
        outcomes.append(outcome)
        cosine, judged, delivery = _judge(attempt, outcome, out_dir, held_out, floor, on_event)
        if delivery is not None:
            delivered = (index, delivery)
            if delivery.failed is not None or cosine >= floor:
                outcome["status"] = "within floor" if delivery.failed is None else "int8 ONNX failed its check"
                return outcomes, index, final, delivery
        outcome.update(status="floor crossed", reason=f"{judged} {cosine:.4f} < min-cosine {floor:g}")
        _emit(on_event, "back-off", outcome)
        if best is None or cosine > best[0]:
            best = (cosine, index, final)
    if best is None:
        return outcomes, None, None, None
    _, index, final = best
    outcomes[index]["status"] = "kept although the floor is crossed (closest to it of all attempts)"
    if delivered is None or delivered[0] != index:  # out/export holds a later attempt's graph, or none
        delivered = (index, deliver(Path(final), out_dir, held_out))
    return outcomes, index, final, delivered[1]


def _compare(original, final: Path, metrics: dict, out_dir: Path, delivery: Delivery, held_out) -> None:
    """comparison.json: the report's side-by-side table in its encoder form, of the delivered int8
    ONNX when there is one (kompakt.report.compare_encoder), its fidelity the one the attempt was
    judged by, both sides timed on the run's held-out sentences."""
    from kompakt.model.load import load
    from kompakt.report.compare import machine
    from kompakt.report.compare_encoder import OnnxDeployment, compare_encoder

    deployed = None
    if delivery.fidelity is not None:
        deployed = OnnxDeployment(Path(delivery.exports["onnx"]), delivery.fidelity)
    comparison = compare_encoder(original, load(final), final, metrics, deployed=deployed,
                                 timing=held_out.data.eval_sentences())  # fmt: skip
    comparison["machine"] = machine()
    write_text(out_dir / "comparison.json", json.dumps(comparison, indent=1, default=str) + "\n")


def _write_recipe(plan: EncoderPlan, index: int, out_dir: Path, model: str, seed: int) -> None:
    """recipe.yaml: attempt `index` as a recipe to edit and rerun; none for the int8-only attempt
    (no steps: `kompakt export ORIGINAL --format onnx --type int8` is all it does)."""
    if plan.attempts[index].steps:
        write_text(out_dir / "recipe.yaml", plan.recipe(index, model, seed).to_yaml())
    else:
        (out_dir / "recipe.yaml").unlink(missing_ok=True)


def compress_encoder(model: str | None, *, target: str | None = None, budget: str | None = None,
                     data: str | None = None, out: str | Path | None = None, plan_only: bool = False, seed: int = 0,
                     force: bool = False, on_step: Callable[[dict], None] | None = None,
                     on_event: Callable[[str, dict], None] | None = None):  # fmt: skip
    """Plan and run `compress --target` on a sentence encoder (see the module docstring).

    Raises (before any work): ConfigError for a target that does not apply to encoders or is out
    of reach (the message states the reachable minimum); OutputPathError for a run directory of
    another model or target; DataError for a missing --data.
    """
    from kompakt.model.load import load
    from kompakt.report.build import build_report

    started = time.perf_counter()
    goal = encoder_target(target)
    budget_s = parse_budget(budget)
    if data is not None and not Path(data).expanduser().exists():
        raise DataError(f"--data {data} not found; give a file of sentences (one per line, or prose)")
    original = load(model)
    out_dir = (Path(out) if out is not None else default_out(model, goal)).expanduser().absolute()
    check_out(out_dir, original.fingerprint(), goal, force)
    plan = _saved_plan(out_dir, original.fingerprint(), budget_s, data)
    if plan is None:
        facts = encoder_facts(original, budget_s is not None, data if goal.goal == "params" else None, data,
                              int8=goal.goal == "speed")  # fmt: skip
        plan = make_encoder_plan(goal, facts, budget_s, data)
    with reporting_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    name = str(model or original.name)
    write_text(out_dir / AUTO_FILE, json.dumps({"model": name, "fingerprint": plan.facts.fingerprint,
                                                "target": goal.text, "kind": "encoder"}) + "\n")  # fmt: skip
    write_text(out_dir / "plan.json", json.dumps(plan.to_dict(), indent=1, default=str) + "\n")
    _write_recipe(plan, 0, out_dir, name, seed)
    result = EncoderResult(out_dir, plan)
    if plan_only:
        return result
    held_out = _held_out(plan, original, out_dir, seed)
    outcomes, index, final, delivery = _run_attempts(plan, out_dir, original, held_out, name, seed, on_step, on_event)
    result.outcomes, result.attempt = outcomes, index
    failed = None  # an ONNX export that failed its check: reported first, then raised
    if final is not None:
        result.final = final
        _write_recipe(plan, index, out_dir, name, seed)
        atomic_symlink(out_dir / "final", str(Path(final).resolve().relative_to(out_dir)))
        _emit(on_event, "deliver", {})
        result.exports, failed = delivery.exports, delivery.failed
        write_text(out_dir / "exports.json", json.dumps(result.exports, indent=1) + "\n")
        if failed is None:
            _compare(original, Path(final), outcomes[index]["metrics"], out_dir, delivery, held_out)
        else:
            (out_dir / "comparison.json").unlink(missing_ok=True)  # an earlier run's, of a good export
    result.wall_s = time.perf_counter() - started
    write_text(out_dir / "outcome.json", json.dumps({"outcomes": outcomes, "wall_s": result.wall_s, "attempt": index},
                                                    indent=1, default=str) + "\n")  # fmt: skip
    result.report = build_report(out_dir)
    if failed is not None:
        raise failed
    return result
