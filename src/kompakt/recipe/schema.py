"""Recipes: flat YAML <-> `Recipe` objects, round-trip exact, validated without loading weights.

A recipe names the model, the data for calibration and evaluation, the metrics computed after
every step, quality gates, the list of steps and the exports::

    model: smollm2-135m          # a local HF directory, a .gguf file, an embedded name; null = default
    seed: 0
    data:
      calibration: null          # a text / jsonl / parquet / dataset path; null = self-generated
      evaluation: null           # null = held-out part of the calibration source
      calibration_blocks: 128
      block_len: 512
      eval_tokens: 4096
      window: 512
      stride: 512
    metrics: [ppl, kl, top1]     # also: speed (prefill / generation tokens per second);
                                 # sentence encoders: cosine (+ recall@10, Spearman) and speed
    gates:
      max_ppl_ratio: 1.5         # stop when ppl(step) / ppl(original) exceeds this
      max_kl: null
      min_top1: null
      min_cosine: null           # encoders: stop when the mean cosine to the original falls below
    steps:
      - prune.depth: {fraction: 0.25}
    exports: []

Relative paths are relative to the working directory of the command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kompakt.errors import ConfigError, DataError

# "cosine": sentence encoders' embedding fidelity (cosine, recall@10, Spearman vs the original),
# which an encoder's steps always get (kompakt.recipe.encoder_measure); listed for its gate.
METRICS = ("ppl", "kl", "top1", "speed", "cosine")
DEFAULT_METRICS = ("ppl", "kl", "top1")
# gate name -> (metric it needs, key in a step's metrics, "max" or "min")
GATES: dict[str, tuple[str, str, str]] = {
    "max_ppl_ratio": ("ppl", "ppl_ratio", "max"),
    "max_kl": ("kl", "kl_mean", "max"),
    "min_top1": ("top1", "top1", "min"),
    "min_cosine": ("cosine", "cosine_mean", "min"),
}


@dataclass
class DataSpec:
    """Where calibration and evaluation text come from and how much of it is used."""

    calibration: str | None = None
    evaluation: str | None = None
    calibration_blocks: int = 128
    block_len: int = 512
    eval_tokens: int = 4096
    window: int = 512
    stride: int = 512

    def validate(self) -> None:
        for name in ("calibration_blocks", "block_len", "eval_tokens", "window", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
        for name in ("calibration", "evaluation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"data.{name} must be a path or null, got {value!r}")
            if value is not None and not Path(value).expanduser().exists():
                raise DataError(f"data.{name}: {value} not found; give an existing file or directory")
        if self.stride > self.window:
            raise ConfigError(f"data.stride ({self.stride}) must not exceed data.window ({self.window})")
        if self.eval_tokens < self.window:
            raise ConfigError(
                f"data.eval_tokens ({self.eval_tokens}) is shorter than one window ({self.window}); "
                "raise eval_tokens or lower window"
            )


@dataclass
class Gates:
    """Bounds a step's result must stay within; None = no bound."""

    max_ppl_ratio: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None  # sentence encoders: mean cosine to the original's embeddings

    def active(self) -> dict[str, float]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    def validate(self, metrics: list[str]) -> None:
        for name, value in self.active().items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"gates.{name} must be a number, got {value!r}")
            needed = GATES[name][0]
            if needed not in metrics:
                raise ConfigError(
                    f"gate {name} needs metric {needed!r}, which this recipe does not compute; "
                    f"add {needed} to metrics or remove the gate"
                )


@dataclass
class Step:
    """One step: a registered pass name and its config values (as written by the user)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: dict(self.config)}

    @classmethod
    def from_dict(cls, item: Any, where: str = "steps") -> Step:
        if isinstance(item, str):  # `- prune.depth` with every field at its default
            return cls(item, {})
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{where}: each step is a one-key mapping like `- prune.depth: {{fraction: 0.25}}`, "
                f"got {item!r}"
            )
        (name, config), = item.items()
        if config is None:
            config = {}
        if not isinstance(name, str) or not isinstance(config, dict):
            raise ConfigError(f"{where}: step {name!r} needs a mapping of config fields, got {config!r}")
        return cls(name, dict(config))

    @classmethod
    def parse(cls, spec: str) -> Step:
        """The CLI shortcut `prune.sparse:method=wanda,sparsity=0.5`, `share.basis:group_sizes=[2, 4]`.

        Pairs are split at the commas outside brackets, braces and quotes. A value that starts with
        `[`, `{` or a quote is read as flow YAML (`[2, 4]`, `{a: 1}`, `"x,y"`); any other value stays
        the text it is and the pass coerces it to its field's type, as before: read as YAML 1.1,
        `nm=2:4` would become the integer 124 and `side=no` a boolean.
        """
        name, _, rest = spec.partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"--step {spec!r}: write PASS or PASS:key=value,key=value")
        config: dict[str, Any] = {}
        for part in _split_pairs(rest, spec):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--step {spec!r}: {part!r} is not key=value")
            config[key.strip()] = _step_value(value.strip(), spec)
        return cls(name, config)

    def spec_and_config(self) -> tuple[Any, Any]:
        """The registered PassSpec and the built (typed, validated) config."""
        from kompakt.passes.base import build_config, get_pass

        spec = get_pass(self.name)
        return spec, build_config(spec, self.config)

    def resolved(self) -> Step:
        """This step with every config field written out (defaults filled, values typed)."""
        _, config = self.spec_and_config()
        return Step(self.name, _plain(dataclasses.asdict(config)))


_CLOSERS = {"[": "]", "{": "}"}
_QUOTE_AFTER = "=[{,:"  # a quote opens a YAML scalar only where a value starts (not it's in a path)


def _split_pairs(text: str, spec: str) -> list[str]:
    """`text` cut at the commas outside brackets, braces and quotes (empty pieces dropped)."""
    parts, current, closers, quote, previous = [], [], [], None, "="
    for char in text:
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "\"'" and previous in _QUOTE_AFTER:
            quote = char
        elif char in _CLOSERS:
            closers.append(_CLOSERS[char])
        elif char in "]}" and (expected := closers.pop() if closers else None) != char:
            where = f"where {expected!r} should close" if expected else "closing nothing"
            raise ConfigError(f"--step {spec!r}: {char!r} {where}; write lists as [2, 4] and mappings as {{a: 1}}")
        elif char == "," and not closers:
            parts.append("".join(current))
            current, previous = [], "="
            continue
        current.append(char)
        previous = char if not char.isspace() else previous
    if quote is not None or closers:
        raise ConfigError(f"--step {spec!r}: {quote or closers[-1]!r} is missing at the end; close the value")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _step_value(text: str, spec: str) -> Any:
    """One `--step` value: null / none -> None, flow YAML when it starts with [ { or a quote, else the text."""
    if text.lower() in ("null", "none"):
        return None
    if not text or text[0] not in "[{\"'":
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"--step {spec!r}: {text} is not a YAML value ({problem}); write lists as [2, 4], "
                          'mappings as {a: 1}, text with commas in quotes ("x,y")') from None


@dataclass
class Recipe:
    """A whole compression run: model, data, metrics, gates, steps, exports."""

    model: str | None = None
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    gates: Gates = field(default_factory=Gates)
    steps: list[Step] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)

    # --- plain data -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seed": self.seed,
            "data": dataclasses.asdict(self.data),
            "metrics": list(self.metrics),
            "gates": dataclasses.asdict(self.gates),
            "steps": [step.to_dict() for step in self.steps],
            "exports": [dict(item) for item in self.exports],
        }

    @classmethod
    def from_dict(cls, values: Any) -> Recipe:
        """Build a Recipe from plain data; unknown keys are ConfigErrors listing the valid ones."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"a recipe is a mapping of {', '.join(_TOP_KEYS)}; got {type(values).__name__}")
        _check_keys("recipe", values, _TOP_KEYS)
        steps = values.get("steps") or []
        exports = values.get("exports") or []
        if not isinstance(steps, list):
            raise ConfigError("steps must be a list of one-key mappings like `- prune.depth: {fraction: 0.25}`")
        if not isinstance(exports, list) or not all(isinstance(item, dict) for item in exports):
            raise ConfigError("exports must be a list of mappings")
        metrics = values.get("metrics", list(DEFAULT_METRICS))
        if not isinstance(metrics, list):
            raise ConfigError(f"metrics must be a list drawn from {', '.join(METRICS)}")
        model = values.get("model")
        return cls(
            model=None if model is None else str(model),
            seed=values.get("seed", 0),
            data=_section(DataSpec, "data", values.get("data")),
            metrics=list(metrics),
            gates=_section(Gates, "gates", values.get("gates")),
            steps=[Step.from_dict(item, f"steps[{i}]") for i, item in enumerate(steps)],
            exports=[dict(item) for item in exports],
        )

    # --- YAML -------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        """Block style for the sections, one flow-style line per step, metric list and export."""
        values = self.to_dict()
        values["metrics"] = _FlowList(values["metrics"])
        values["steps"] = [{name: _FlowDict(config)} for step in values["steps"] for name, config in step.items()]
        values["exports"] = [_FlowDict(item) for item in values["exports"]]
        return yaml.dump(values, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"recipe is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
        return cls.from_dict(values)

    @classmethod
    def from_file(cls, path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} not found; give the path of a recipe YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read recipe {path}: {error}") from None
        return cls.from_yaml(text)

    # --- checks -----------------------------------------------------------------------------
    def validate(self) -> Recipe:
        """Check everything that can be checked without weights; returns the resolved recipe
        (every step config written out in full). Raises ConfigError with one line."""
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.data.validate()
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(map(str, unknown))}; valid metrics: {', '.join(METRICS)}")
        self.gates.validate(self.metrics)
        if not self.steps:
            raise ConfigError("the recipe has no steps; add at least one (see `kompakt passes list`)")
        for index, item in enumerate(self.exports):
            if not all(isinstance(key, str) for key in item):
                raise ConfigError(f"exports[{index}]: keys must be strings")
        resolved = [step.resolved() for step in self.steps]
        return dataclasses.replace(self, steps=resolved, metrics=list(self.metrics))


_TOP_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))


def _check_keys(where: str, values: dict, valid: tuple[str, ...]) -> None:
    unknown = [str(key) for key in values if key not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


def _section(cls: type, where: str, values: Any) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    _check_keys(where, values, tuple(f.name for f in dataclasses.fields(cls)))
    return cls(**values)


class _FlowDict(dict):
    pass


class _FlowList(list):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowDict, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
)
_Dumper.add_representer(
    _FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _plain(value: Any) -> Any:
    """Tuples -> lists (YAML and JSON round-trip them as lists)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
