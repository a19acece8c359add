"""The pass contract, over every registered pass x every tiny family (one TEST_CASES matrix, as
PEFT's tests/test_custom_models.py): a pass registered tomorrow is covered without editing this file.

Each case takes the pass's documented sample step (the `Sample recipe step::` block of its module
docstring, validated unchanged through the recipe schema), shrinks its budget through the same
typed config, applies it to a tiny model with the data the runner would hand it, saves the result
as the runner does, reloads it with `kompakt.load`, and checks: the reloaded logits (a sentence
encoder's embeddings) equal the in-memory ones (to the storage dtype's precision); the shapes and the quantized state survive
the round trip; the model is still its family's class (no wrapper left); the pass used only
what it declared (calibration, teacher, training) and kept the architecture unless it declared
a change; and `kompakt.evaluate` gives a finite perplexity and KL to the original (an encoder:
finite cosines to the original's embeddings). Sentence encoders (every tiny encoder family) are
rows of the same matrix: a pass that declares `decoder_only` must refuse them in one line before
it runs (`check_model`, what the recipe runner calls), every other pass must run as above. The
Mixture-of-Experts families (TINY_MOE) are rows too: a pass that declares `dense_only` refuses
them the same way.
Relative quality (GPTQ <= RTN, Wanda <= magnitude, ...) lives in the per-pass test files.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
import yaml

import kompakt
from kompakt.model.arch import is_moe
from kompakt.model.loaded import LoadedModel
from kompakt.model.quantized import is_quantized
from kompakt.errors import ConfigError
from kompakt.model.encode import embed
from kompakt.model.tiny import TINY_ENCODERS, TINY_FAMILIES, TINY_MOE, tiny_encoder, tiny_model
from kompakt.passes.base import PassContext, PassSpec, build_config, check_model, config_fields, registry
from kompakt.passes.train_common import TrainingConfig
from kompakt.recipe.rundata import RunData
from kompakt.recipe.schema import DataSpec
from kompakt.rundir.stepsave import save_step_model
from vocab_tokenizers import byte_level_tokenizer, model_with

PASSES = registry()
TEST_CASES = [
    pytest.param(name, family, id=f"{name}-{family}")
    for name in sorted(PASSES)
    for family in TINY_FAMILIES + TINY_MOE + TINY_ENCODERS
]

# Budget overrides, by the config type that owns the fields (never by pass name, so a new pass
# needs no row): every training pass builds on TrainingConfig and gets the smallest run. Passes
# that calibrate are kept fast by the small calibration set of DATA.
FAST: dict[type, dict[str, Any]] = {
    TrainingConfig: {"steps": 2, "seq_len": 32, "batch_size": 2, "checkpoint_every": 0},
}
# Sample steps name the user's files (`data: corpus.txt`, `teacher: ./big`); here the run's data
# and the recipe's original stand in for them, as in a recipe run with --data.
RUN_INPUTS = {"data": None, "teacher": None}
# Reloaded logits may differ from the in-memory ones only by the rounding of the stored dtype (a
# quantized step keeps its unquantized weights in 16 bits): a few units in the last place of
# that dtype, relative to the size of the logits.
ULPS = 10
DATA = DataSpec(calibration_blocks=8, block_len=64, eval_tokens=512, window=64, stride=64)
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
SENTENCES = ["the small model reads a sentence.", "layers of weights and tokens run in steps, step by step."]
_SAMPLE = re.compile(r"Sample recipe steps?::\s*\n((?:[ \t]*\n|[ \t]+- .*\n?)+)")

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_steps(spec: PassSpec) -> list[dict[str, Any]]:
    """The sample recipe steps of a pass's docstring, as YAML step mappings."""
    match = _SAMPLE.search(spec.doc)
    assert match, f"{spec.name}: its module docstring needs a 'Sample recipe step::' block"
    steps = yaml.safe_load(textwrap.dedent(match.group(1)))
    assert isinstance(steps, list) and steps, f"{spec.name}: the sample block is not a YAML list of steps"
    return steps


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The run's data: word salad, enough for calibration blocks, training and held-out text."""
    words = "the a model layer small token weight data run step of to and in is it that text".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(600)) + "\n")
    return path


@pytest.fixture(scope="module")
def run_inputs(text_file) -> Callable[[str], tuple[LoadedModel, RunData]]:
    """family -> (original, its RunData), built once per module: the teacher / reference model and
    the calibration, training and evaluation tokens the runner would give every pass."""
    cache: dict[tuple[str, bool], tuple[LoadedModel, RunData]] = {}

    def get(family: str, merges: bool = False) -> tuple[LoadedModel, RunData]:
        key = (family, merges and family not in TINY_ENCODERS)
        if key not in cache:
            if family in TINY_ENCODERS:
                original = tiny_encoder(family)
            else:
                original = model_with(byte_level_tokenizer(), family) if key[1] else tiny_model(family)
            cache[key] = original, RunData(dataclasses.replace(DATA, calibration=str(text_file)), original, 0)
        return cache[key]

    return get


def _declared(flag: bool, provide: Callable, spec: PassSpec, what: str) -> Callable:
    """`provide`, or a function that fails the test: a pass uses only what it declares, because the
    runner hashes a step's data identity only for passes that declare a need for data."""

    def undeclared(*args, **kwargs):
        pytest.fail(f"{spec.name} uses {what} but does not declare it in its PassSpec")

    return provide if flag else undeclared


def _context(spec: PassSpec, config: Any, student: LoadedModel, original: LoadedModel, data: RunData,
             work) -> PassContext:  # fmt: skip
    return PassContext(
        loaded=student,
        original=_declared(spec.needs_teacher, lambda: original, spec, "the original"),
        calibration=_declared(spec.uses_calibration(config), data.calibration, spec, "calibration data"),
        teacher=_declared(spec.needs_teacher, lambda path: original, spec, "a teacher"),
        training=_declared(spec.needs_training, data.training, spec, "training data"),
        evaluation=data.evaluation,
        seed=0,
        work_dir=work,
    )


def _config(spec: PassSpec) -> tuple[list[tuple[PassSpec, Any]], Any]:
    """(the sample steps before the pass's own, the pass's first own sample step): each validated
    as written, then made small and pointed at the run's inputs through the same typed config.
    Steps before it set up what the pass needs (`quant.gptq` before `lowrank.compensate`)."""
    steps = sample_steps(spec)
    kompakt.Recipe.from_dict({"steps": steps}).validate()  # the documented sample validates unchanged
    pairs = [(name, values) for step in steps for name, values in step.items()]
    own = next((i for i, (name, _) in enumerate(pairs) if name == spec.name), None)
    assert own is not None, f"{spec.name}: its sample block has no {spec.name} step"
    before = [(PASSES[name], _shrunk(PASSES[name], values)) for name, values in pairs[:own]]
    return before, _shrunk(spec, pairs[own][1])


def _shrunk(spec: PassSpec, values: dict[str, Any] | None) -> Any:
    values = dict(values or {})
    values.update({key: value for key, value in RUN_INPUTS.items() if key in config_fields(spec.config)})
    for owner, fast in FAST.items():
        if issubclass(spec.config, owner):
            values.update(fast)
    return build_config(spec, values)


# Passes that trim the vocabulary run on a tiny decoder whose tokenizer has merges (a small real
# BPE, tests/passes/vocab_tokenizers.py): the tiny tokenizers' tokens are bytes, which trimming
# always keeps, so there would be nothing to trim.
TRIMS_VOCABULARY = {"prune.vocab"}


def _logits(loaded: LoadedModel) -> torch.Tensor:
    """Next-token logits of a causal LM; a sentence encoder's embeddings of SENTENCES."""
    if loaded.is_encoder:
        return embed(loaded, SENTENCES)
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits.float()


def _shapes(loaded: LoadedModel) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in loaded.model.state_dict().items()}


@pytest.mark.parametrize("name, family", TEST_CASES)
def test_pass_contract(name, family, run_inputs, tmp_path):
    spec = PASSES[name]
    before, config = _config(spec)
    original, data = run_inputs(family, merges=name in TRIMS_VOCABULARY)
    if original.is_encoder and spec.decoder_only:
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)} does not run on sentence encoders .*: \S"):
            check_model(spec, original)
        return
    if family in TINY_MOE and spec.dense_only:
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)} does not run on Mixture-of-Experts models .*: \S"):
            check_model(spec, original)
        return
    if spec.moe_only and not is_moe(original):  # expert passes refuse dense models in one line
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)} runs on Mixture-of-Experts models only .*: \S"):
            check_model(spec, original)
        return
    check_model(spec, original)
    student = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name=original.name,
                          pooling=original.pooling)
    work = tmp_path / "work"
    work.mkdir()
    for step, step_config in before:
        student = step.apply(_context(step, step_config, student, original, data, work), step_config).loaded
    input_dtype = student.storage_dtype

    report = spec.apply(_context(spec, config, student, original, data, work), config)

    result = report.loaded
    assert report.summary and isinstance(report.details, dict)
    assert type(result.model) is type(original.model), f"{name} left a wrapper around the model"
    assert all(path.exists() for path in report.files.values()), report.files
    if not spec.changes_architecture:
        assert _shapes(result) == _shapes(original), f"{name} changed shapes without declaring it"
    logits = _logits(result)
    assert torch.isfinite(logits).all()
    before_logits = _logits(original)
    # the tiny encoders' tokenizers are characters / bytes, all kept: their embeddings stay as they
    # were (trimming a real WordPiece vocabulary: tests/passes/test_prune_vocab_encoder.py)
    changed = not (original.is_encoder and name in TRIMS_VOCABULARY)
    if name in TRIMS_VOCABULARY and changed:
        assert len(result.tokenizer) < len(original.tokenizer), f"{name} trimmed nothing from the {family} model"
    if not changed:
        torch.testing.assert_close(logits, before_logits)
    elif logits.shape == before_logits.shape:  # a pass that did nothing on this family fails here
        assert not torch.equal(logits, before_logits), f"{name} left the {family} model's outputs unchanged"

    save_step_model(result, tmp_path / "step", input_dtype, report.packed_layers)
    reloaded = kompakt.load(tmp_path / "step")
    assert _shapes(reloaded) == _shapes(result)
    assert is_quantized(reloaded) == is_quantized(result), "what the pass left on the model did not survive"
    eps = max(torch.finfo(result.storage_dtype).eps, torch.finfo(reloaded.storage_dtype).eps)
    atol = ULPS * eps * max(1.0, float(logits.abs().max()))
    reloaded_logits = _logits(reloaded)
    torch.testing.assert_close(reloaded_logits, logits, rtol=0, atol=atol)

    if original.is_encoder:
        cosines = torch.nn.functional.cosine_similarity(reloaded_logits, before_logits)
        assert torch.isfinite(cosines).all(), cosines
        return
    evaluated = kompakt.evaluate(reloaded, reference=original, ids=data.evaluation(), window=DATA.window,
                                 speed=False)  # fmt: skip
    assert torch.isfinite(torch.tensor([evaluated.ppl, evaluated.kl_mean])).all(), evaluated
    assert evaluated.kl_mean > 0, evaluated


# Settings under which a pass that may calibrate reads no data (their configs' uses_calibration()),
# and the change of setting that makes the same step read it.
CALIBRATION_FREE = [
    ("prune.sparse", {"method": "magnitude", "sparsity": 0.5}, {"method": "wanda"}),
    ("prune.width", {"importance": "random", "mlp_fraction": 0.5}, {"importance": "activation"}),
    ("prune.depth", {"method": "last", "count": 1}, {"method": "block_influence"}),
    ("prune.depth", {"select": "every_other"}, {"select": "importance", "count": 1}),
    ("share.layers", {"init": "average", "ratio": 0.5}, {"init": "regmean"}),
    ("lowrank.svd", {"method": "plain", "target_params": 0.2}, {"method": "svd-llm"}),
]


@pytest.mark.parametrize("name, values, reading", CALIBRATION_FREE,
                         ids=[f"{n}-{next(iter(v.values()))}" for n, v, _ in CALIBRATION_FREE])  # fmt: skip
def test_settings_that_need_no_data_never_read_it(name, values, reading, run_inputs, tmp_path):
    """The pass runs with a calibration source that fails the test (what _declared gives when
    uses_calibration says no); the same step with the other setting does declare data."""
    spec = PASSES[name]
    config = build_config(spec, values)
    assert not spec.uses_calibration(config) and spec.uses_calibration(build_config(spec, {**values, **reading}))
    original, data = run_inputs("llama")
    student = LoadedModel(model=copy.deepcopy(original.model), tokenizer=original.tokenizer, name=original.name)
    report = spec.apply(_context(spec, config, student, original, data, tmp_path), config)
    assert torch.isfinite(_logits(report.loaded)).all()
