"""Run a recipe stepwise: apply a pass, save, evaluate against the original, record, repeat.

Run directory layout::

    out_dir/recipe.yaml            the resolved recipe (every step config written out)
    out_dir/lineage.jsonl          one JSON line per finished step
    out_dir/steps/01-prune.depth/  the model after step 1 (a loadable HF directory)
    out_dir/run.json               the original's row and the gate stop, if any (for the report)
    out_dir/final -> steps/NN-...  the last finished step that passed the gates
    out_dir/report.md              the trajectory, written at the end (also on a gate stop) by
                                   kompakt.report, which `kompakt report` rebuilds it with

Resume: step i's identity is hash(step i-1's hash or the original's fingerprint, pass,
resolved config, data identity, seed). A rerun skips the finished steps whose hashes match
and continues from the last one's saved model. Every step, fresh or resumed, starts from the
previous step's model as reloaded from disk and from torch seeded with (seed, step index), so
a run killed mid-step and restarted ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kompakt.errors import KompaktError
from kompakt.model.loaded import LoadedModel
from kompakt.passes.base import PassContext, check_model
from kompakt.recipe.rundata import Measurer, RunData, measurer_for
from kompakt.recipe.schema import GATES, Recipe
from kompakt.recipe.stream_run import (
    SizeMeasurer,
    lazy_loaded,
    streamed_input,
    streamed_original,
)
from kompakt.recipe.stream_step import must_spill, streamed_step
from kompakt.rundir import layout
from kompakt.rundir.hashing import digest, step_hash
from kompakt.rundir.lineage import append_record
from kompakt.units import parse_memory

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]


class GateError(KompaktError):
    """A step's result crossed a quality gate; the run stopped, finished steps are kept."""

    exit_code = 3


@dataclass
class RunResult:
    """What a run produced: its directory, the baseline row and one record per finished step."""

    out_dir: Path
    recipe: Recipe
    baseline: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    final: Path | None = None
    stopped: str | None = None  # the gate message when a gate stopped the run


@dataclass
class _Planned:
    index: int  # 1-based
    name: str
    config: Any  # the built config dataclass
    spec: Any  # PassSpec
    resolved: dict[str, Any]
    hash: str
    input: str


def _plan(recipe: Recipe, fingerprint: str, data: RunData) -> list[_Planned]:
    planned, previous = [], fingerprint
    data_id = data.identity()
    for index, step in enumerate(recipe.steps, start=1):
        spec, config = step.spec_and_config()
        uses_data = spec.uses_calibration(config) or spec.needs_teacher or spec.needs_training
        h = step_hash(previous, step.name, step.config, data_id if uses_data else None, recipe.seed)
        planned.append(_Planned(index, step.name, config, spec, step.config, h, previous))
        previous = h
    return planned


def step_seed(seed: int, index: int) -> int:
    """The torch seed of step `index`: a stable function of the run seed and the index."""
    return int(digest({"seed": seed, "step": index}), 16) % (2**63)


def check_gates(recipe: Recipe, record: dict[str, Any]) -> str | None:
    """The first crossed gate as a one-line message, or None."""
    metrics = record.get("metrics", {})
    for name, bound in recipe.gates.active().items():
        _, key, kind = GATES[name]
        value = metrics.get(key)
        if value is None:
            continue
        if (kind == "max" and value > bound) or (kind == "min" and value < bound):
            kept = f"final = step {record['index'] - 1}" if record["index"] > 1 else "no step passed"
            return (
                f"step {record['index']} ({record['pass']}) crossed gate {name}: {key} = {value:.4g} "
                f"{'>' if kind == 'max' else '<'} {bound}; run stopped ({kept} in "
                f"{record.get('run_dir', 'the run directory')}) — loosen the gate or make the step gentler"
            )
    return None


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    force: bool = False,
    on_step: StepCallback | None = None,
    reference_dir: Path | None = None,
    max_memory: int | str | None = None,
) -> RunResult:
    """Run `recipe` into `out_dir`, resuming finished steps; see the module docstring.

    Args:
        recipe: the recipe (validated here first; nothing is loaded when it is invalid).
        out_dir: the run directory (created; an existing run of the same recipe resumes).
        force: replace an existing run directory of a different recipe or model.
        on_step: called with the baseline row (index 0) and then each step's record.
        reference_dir: where the original's distributions on the evaluation text are cached
            (default out_dir/reference); runs that share one compute them once.
        max_memory: RAM budget ("6GB", bytes); a model whose fp32 weights plus calibration
            working memory exceed it runs streamed, one decoder layer at a time
            (kompakt.recipe.stream_run); None: always in memory.

    Raises:
        ConfigError: an invalid recipe (before any weights are loaded).
        OutputPathError: out_dir is a file, not a run directory, or another recipe's run.
        GateError: a step crossed a gate (every finished step is kept).
    """
    from kompakt.model.load import load
    from kompakt.train.distributed import run_dir_for_process, setup_process_device

    recipe = recipe.validate()
    setup_process_device()  # under `accelerate launch`: one GPU per process
    original = streamed_original(recipe, max_memory)  # a lazy skeleton when larger than the budget
    streamed = original is not None
    original = original or load(recipe.model)
    for step in recipe.steps:  # a pass that cannot run on this model: refused before anything is written
        check_model(step.spec_and_config()[0], original)
    out = layout.prepare(run_dir_for_process(Path(out_dir)), force=force)
    data = RunData(recipe.data, original, recipe.seed)
    planned = _plan(recipe, original.fingerprint(), data)
    eval_id = data.eval_identity(recipe.metrics)
    finished = layout.check_lineage(out, [p.hash for p in planned], eval_id)
    layout.write_recipe(out, recipe.to_yaml())
    layout.clean_steps(out, {layout.step_dir_name(p.index, p.name) for p in planned}
                       | {_checkpoint_name(p) for p in planned})  # fmt: skip

    measurer = SizeMeasurer(original) if streamed else measurer_for(original, data, recipe.metrics,
                                                                     reference_dir or out / layout.REFERENCE_DIR)
    baseline = {"index": 0, "pass": "original", "summary": original.name, **measurer.baseline()}
    result = RunResult(out_dir=out, recipe=recipe, baseline=baseline)
    layout.write_run_state(out, baseline, None)
    _notify(on_step, baseline)
    current: LoadedModel | None = None
    for step in planned:
        if step.index <= len(finished):
            record = {**finished[step.index - 1], "skipped": True}
        else:
            if current is None:
                current = _resume_model(out, original, result.records)
            record, current = _run_step(step, current, original, data, measurer, out, recipe.seed,
                                        parse_memory(max_memory))  # fmt: skip
            record["eval_id"] = eval_id
            append_record(out, {k: v for k, v in record.items() if k != "skipped"})
        record["run_dir"] = str(out)
        result.records.append(record)
        _notify(on_step, record)
        message = check_gates(recipe, record)
        if message:
            result.stopped = message
            _finish(result)
            raise GateError(message)
    _finish(result)
    return result


def _notify(on_step: StepCallback | None, record: dict[str, Any]) -> None:
    if on_step is not None:
        on_step(record)


def _resume_model(out: Path, original: LoadedModel, records: list[dict[str, Any]]) -> LoadedModel:
    """The input of the first step to run: the last finished step reloaded, or a copy of the original
    (streamed: opened lazily again, so the original's skeleton is never changed)."""
    from kompakt.model.load import load

    if streamed_input(original) is not None:
        return lazy_loaded(out / records[-1]["dir"] if records else original.path, original.name)  # type: ignore[arg-type]
    if records:
        return load(out / records[-1]["dir"])
    return LoadedModel(
        model=copy.deepcopy(original.model),
        tokenizer=original.tokenizer,
        name=original.name,
        path=original.path,
        storage_dtype=original.storage_dtype,
        pooling=original.pooling,  # an encoder's sentence files (max_seq_length, normalisation) go on
    )


def _checkpoint_name(step: _Planned) -> str:
    """Training checkpoints of a step survive a kill; the hash in the name retires stale ones."""
    return f".ckpt-{layout.step_dir_name(step.index, step.name)}-{step.hash[:16]}"


def _teacher_loader(original: LoadedModel, max_memory: int | None = None) -> Callable[[str | None], LoadedModel]:
    """`teacher(path)`: the original for None, else the model at path, loaded once per run; one
    larger than `max_memory` is opened lazily (distill.kd then needs teacher_cache)."""
    from kompakt.evaluate.api import open_within

    loaded: dict[str, LoadedModel] = {}

    def teacher(path: str | None) -> LoadedModel:
        if path is None:
            return original
        if path not in loaded:
            loaded[path] = open_within(path, max_memory)
        return loaded[path]

    return teacher


def _keep_files(files: dict[str, Path], directory: Path) -> None:
    """Copy a pass's extra outputs (e.g. a LoRA adapter) into the saved step directory; the
    step only counts as finished once its marker is written after this."""
    import shutil

    from kompakt.atomic import reporting_errors

    with reporting_errors(directory, after="the step stays unfinished; rerun to resume"):
        for name, source in files.items():
            target = directory / name
            if Path(source).is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)


def _run_step(step: _Planned, current: LoadedModel, original: LoadedModel, data: RunData, measurer: Measurer,
              out: Path, seed: int, max_memory: int | None = None) -> tuple[dict[str, Any], LoadedModel]:  # fmt: skip
    from kompakt.evaluate import disk_bytes
    from kompakt.model.load import load
    from kompakt.rundir.stepsave import save_step_model

    name = layout.step_dir_name(step.index, step.name)
    directory = out / "steps" / name
    started = time.perf_counter()
    marker = layout.read_marker(directory)
    if marker is not None and marker.get("hash") == step.hash:
        # Saved but not yet recorded when the last run stopped: reuse the saved model.
        summary, details = marker.get("summary", ""), marker.get("details", {})
    else:
        logger.info("step %d: %s %s", step.index, step.name, step.resolved)
        torch.manual_seed(step_seed(seed, step.index))
        work = out / "steps" / f".work-{name}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            ctx = PassContext(loaded=current, original=lambda: original, calibration=data.calibration,
                              seed=seed, work_dir=work, teacher=_teacher_loader(original, max_memory), training=data.training,
                              sentences=data.sentences,
                              evaluation=data.evaluation, checkpoint_dir=out / "steps" / _checkpoint_name(step),
                              run_id=step.hash)  # fmt: skip
            input_dtype = current.storage_dtype  # quant passes raise it to fp32 for exact dense saves
            lazy = streamed_input(current)
            if lazy is not None:  # larger than --max-memory: one layer at a time, written as it goes
                tokens = data.spec.calibration_blocks * data.spec.block_len
                spill = work / "activations" if must_spill(lazy, max_memory, tokens) else None
                report = streamed_step(step.spec, step.config, lazy, directory,
                                       lambda loaded, stream: dataclasses.replace(ctx, loaded=loaded, stream=stream),
                                       spill_dir=spill, resume_dir=ctx.checkpoint_dir / "stream",
                                       key=step.hash)  # fmt: skip
                stored = {"streamed": True, "activations": "disk" if spill is not None else "memory"}
            else:
                report = step.spec.apply(ctx, step.config)
                stored = save_step_model(report.loaded, directory, input_dtype, report.packed_layers)
            _keep_files(report.files, directory)
        finally:
            layout.remove_tree(work)
        layout.remove_tree(out / "steps" / _checkpoint_name(step))  # saved: the checkpoints are done
        summary, details = report.summary, {**report.details, **stored}
        layout.write_marker(directory, {"hash": step.hash, "summary": summary, "details": details})
        del report, ctx
    # Continue from what is on disk, so a resumed run sees exactly the same input.
    loaded = lazy_loaded(directory, current.name) if streamed_input(current) is not None else load(directory)
    wall = time.perf_counter() - started
    started = time.perf_counter()
    metrics = measurer.measure(loaded)
    record = {
        "index": step.index,
        "pass": step.name,
        "config": step.resolved,
        "hash": step.hash,
        "input": step.input,
        "dir": f"steps/{name}",
        "parameters": loaded.num_parameters(),
        "bytes": disk_bytes(directory),
        "metrics": metrics,
        "wall_s": round(wall, 3),
        "eval_s": round(time.perf_counter() - started, 3),
        "summary": summary,
        "details": details,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "skipped": False,
    }
    return record, loaded


def _finish(result: RunResult) -> None:
    """The `final` link (to the last step that passed the gates), run.json and report.md."""
    from kompakt.report.build import build_report

    passed = result.records[:-1] if result.stopped else result.records
    if passed:
        result.final = layout.link_final(result.out_dir, passed[-1]["dir"])
    layout.write_run_state(result.out_dir, result.baseline, result.stopped)
    build_report(result.out_dir, formats=("md",))
