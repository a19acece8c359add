"""What every pass shares: its context, its report, its typed config, and the registry.

A pass is one file (see DESIGN.md): a module docstring (paper, when to use it, a sample
recipe step), one config dataclass, one `apply(ctx, config) -> PassReport`, and a
`PASS = PassSpec(...)` that `kompakt.passes` registers from an explicit import list.
Passes never load a model, name a dataset or read argv: everything arrives in PassContext.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.model.compression import PackedLayer
from kompakt.model.arch import is_moe
from kompakt.model.inputs import Batch
from kompakt.model.loaded import LoadedModel
from kompakt.model.stream_save import LayerStream
from kompakt.model.moe import sparse_layer_problem


@dataclass
class PassContext:
    """Everything a pass may use. Expensive things are lazy: the runner prepares only what is asked.

    Attributes:
        loaded: the model to transform (a pass may change it in place or return a new one).
        original: returns the recipe's original model (teacher / reference), loaded on first call.
        calibration: returns calibration token blocks [n_blocks, block_len], built on first call;
            for a sentence encoder, padded sentences with their attention mask
            (kompakt.model.inputs.SentenceBatch, which slices, splits and moves like the blocks).
        seed: the run's seed; passes seed their own generators from it.
        work_dir: scratch directory of this step (removed when the step is finished).
        teacher: `teacher(path)` returns the teacher model: the original for None, else the
            model at `path` (loaded once). Default: `original()` / kompakt.load.
        training: `training(source, n_tokens, answer_only, generator)` returns training
            tokens (kompakt.train.data.TrainData): the pass's own `source`, else the run's
            data, else text sampled from `generator` (cached). Default: kompakt.train.sources.
        sentences: `sentences(source, n)` returns (sentences, where from) for training an
            encoder: the pass's own `source`, else the run's data, else `n` default sentences
            (kompakt.data.sentences: split from text the embedded SmolLM2 writes, cached).
        evaluation: held-out token ids [N] for evaluation during training (None: the pass
            holds out the end of its training data).
        checkpoint_dir: where training checkpoints survive a killed run (kept until the step
            is saved); None: no checkpoints.
        run_id: identity of this step (the runner's step hash); part of checkpoint identities.
        stream: set when the model is larger than the memory budget: `loaded` is then a lazily
            opened skeleton (kompakt.model.lazy) and a pass that declares `streams` writes each
            decoder layer through this LayerStream (kompakt.model.stream_save) as it finishes it.
    """

    loaded: LoadedModel
    original: Callable[[], LoadedModel]
    calibration: Callable[[], Batch]
    seed: int = 0
    work_dir: Path | None = None
    teacher: Callable[[str | None], LoadedModel] | None = None
    training: Callable[..., Any] | None = None
    sentences: Callable[[str | None, int], tuple[list[str], str]] | None = None
    evaluation: Callable[[], torch.Tensor] | None = None
    checkpoint_dir: Path | None = None
    run_id: str = ""
    stream: LayerStream | None = None

    def teacher_model(self, path: str | None = None) -> LoadedModel:
        """The teacher: the recipe's original (path None) or the model at `path`."""
        if self.teacher is not None:
            return self.teacher(path)
        if path is None:
            return self.original()
        from kompakt.model.load import load

        return load(path)

    def training_data(self, source: str | None, n_tokens: int, *, answer_only: bool = True,
                      generator: LoadedModel | None = None) -> Any:  # fmt: skip
        """Training tokens (TrainData) for a training pass; see `training` above."""
        if self.training is not None:
            return self.training(source, n_tokens, answer_only, generator)
        from kompakt.train.sources import training_tokens

        return training_tokens(source, self.loaded, n_tokens, seed=self.seed, answer_only=answer_only,
                               generator=generator or self.original())  # fmt: skip

    def training_sentences(self, source: str | None, n_sentences: int) -> tuple[list[str], str]:
        """(sentences, where they come from) for training an encoder; see `sentences` above."""
        if self.sentences is not None:
            return self.sentences(source, n_sentences)
        from kompakt.data.sentences import DEFAULT_SOURCE, default_sentences, read_sentences

        if source is not None:
            return read_sentences(source), str(source)
        return default_sentences(n_sentences), f"sentences from text generated by {DEFAULT_SOURCE}"


@dataclass
class PassReport:
    """What a pass did: the resulting model, a one-line summary and JSON-ready details.

    `files`: extra outputs to keep beside the saved model (name in the step directory ->
    a file or directory the pass wrote under ctx.work_dir), e.g. a LoRA adapter on its own.
    `packed_layers`: module name -> PackedLayer (integer codes and scales exactly as the pass
    quantized them); the step is then saved packed (compressed-tensors). Empty: saved dense.
    `details` go into lineage.jsonl once per step: counts and a few names, not one entry per
    layer.
    """

    loaded: LoadedModel
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    packed_layers: Mapping[str, PackedLayer] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its dotted name, config type, apply function and declared needs.

    `streams`: the pass runs on a model larger than memory, one decoder layer at a time, when the
    runner gives it `PassContext.stream`; a pass without it refuses such a model before any work.
    `decoder_only`: empty when the pass also runs on sentence encoders (BERT family); else why it
    needs a causal LM and what to use on an encoder instead, which `check_model` says in one line
    before the run touches anything. `dense_only`: likewise for Mixture-of-Experts models (why the
    pass cannot treat fused experts, and what to use instead); empty when it runs on them.
    `moe_only`: the reverse, for passes that edit experts: empty when the pass runs on dense models
    too, else what it does to experts (said when refusing a dense model).
    `needs_calibration`: the pass may read calibration data; a config with some settings that
    need none (magnitude pruning) says which by a `uses_calibration()` method (`uses_calibration`
    below asks it).
    """

    name: str
    config: type
    apply: Callable[[PassContext, Any], PassReport]
    needs_calibration: bool = False
    needs_teacher: bool = False
    needs_training: bool = False
    changes_architecture: bool = False
    streams: bool = False
    decoder_only: str = ""
    dense_only: str = ""
    moe_only: str = ""
    doc: str = ""

    def uses_calibration(self, config: Any) -> bool:
        """Whether a step of this pass with `config` reads calibration data: the runner hashes the
        data into such a step's identity, a streamed run asks for --data only for such steps."""
        settings = getattr(config, "uses_calibration", None)
        return self.needs_calibration and (settings is None or settings())

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name


def check_model(spec: PassSpec, loaded: LoadedModel) -> None:
    """ConfigError when the pass cannot run on this kind of model (a decoder-only pass given a
    sentence encoder); the recipe runner checks every step once, before the first one runs."""
    if spec.decoder_only and loaded.is_encoder:
        raise ConfigError(f"{spec.name} does not run on sentence encoders such as {loaded.name}: {spec.decoder_only}")
    if spec.moe_only and not loaded.is_encoder and not is_moe(loaded):
        raise ConfigError(f"{spec.name} runs on Mixture-of-Experts models only ({spec.moe_only}); {loaded.name} "
                          "is dense: use prune.width / prune.depth on it instead")  # fmt: skip
    if is_moe(loaded):
        if spec.dense_only:
            raise ConfigError(f"{spec.name} does not run on Mixture-of-Experts models such as {loaded.name}: "
                              f"{spec.dense_only}")  # fmt: skip
        problem = sparse_layer_problem(loaded)
        if problem:
            raise ConfigError(f"{spec.name}: kompakt runs on MoE models whose every layer is sparse; {problem}")


def doc(text: str) -> dict[str, str]:
    """A config field's metadata: its one-line help (what `kompakt passes show` prints)."""
    return {"doc": text}


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def build_config(spec: PassSpec, values: dict[str, Any]) -> Any:
    """Build the pass config from plain values; unknown keys and wrong types are ConfigErrors."""
    fields = config_fields(spec.config)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{spec.name}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(spec.config)
    coerced = {name: _coerce(spec.name, name, value, hints[name]) for name, value in values.items()}
    try:
        config = spec.config(**coerced)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{spec.name}: {error}") from None
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()  # raises ConfigError with a pass-specific message
    return config


def _coerce(pass_name: str, name: str, value: Any, hint: Any) -> Any:
    """Accept the obvious conversions (CLI strings, YAML ints for floats); reject the rest."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind in (int, float) and isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        origin = typing.get_origin(kind) or kind
        if isinstance(origin, type) and isinstance(value, origin) and not (
            isinstance(value, bool) and kind in (int, float)
        ):
            return value
        if kind is typing.Any:
            return value
    quote = ""
    if str in allowed and isinstance(value, int):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124.
        quote = ' (quote it in YAML: nm: "2:4")'
    elif isinstance(value, str) and any(typing.get_origin(kind) is list for kind in allowed):
        quote = f" (write a list as [2, 4], on the command line too: {name}=[2, 4])"
    raise ConfigError(f"{pass_name}: field {name} got {value!r}; expected {hint}{quote}")


_REGISTRY: dict[str, PassSpec] = {}


def register(spec: PassSpec) -> PassSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"pass {spec.name} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, PassSpec]:
    """All passes by dotted name (importing kompakt.passes fills it from its explicit list)."""
    import kompakt.passes  # noqa: F401  (the import list registers the passes)

    return dict(_REGISTRY)


def get_pass(name: str) -> PassSpec:
    passes = registry()
    if name not in passes:
        raise ConfigError(f"unknown pass {name!r}; available: {', '.join(sorted(passes))}")
    return passes[name]
