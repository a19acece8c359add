"""Candidate shapes for a parameter target: layers kept, MLP width, KV groups and hidden size.

Why a search over shapes: the planner's fixed rule (Minitron width: MLP and hidden, 1.4:1) is
one point of a space in which depth, heads and mixes can be better for a given model; the
search proposes a spread of that space and lets measurement (a short distillation, then KL)
choose.

Every candidate is within `tolerance` (±3 %) of the target parameter count, uses one width per
layer type (uniform, so transformers' config and llama.cpp load it), and its widths are
multiples of `unit` (64, or the head dimension on models too small for 64); hidden widths must
also give a config transformers accepts (Llama requires hidden % heads == 0, so on SmolLM2 a
hidden cut comes with a head cut). Parameter counts are exact: the model is built on the meta
device (no memory) for each (hidden, KV groups) pair at one and two layers and two MLP widths,
and the count is linear in layers and in MLP width from there.

Each candidate becomes recipe steps (prune.depth with an explicit count, then prune.width with
explicit sizes) so the existing passes cut it with their importance scores.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from kompakt.errors import ConfigError
from kompakt.model.arch import arch_for, text_config
from kompakt.model.loaded import LoadedModel
from kompakt.model.surgery import config_problem, head_dim_of
from kompakt.recipe.schema import Step

TOLERANCE = 0.03
DIMS = ("depth", "mlp", "heads", "hidden")
# Spread first: the pure cuts, Minitron's width pair, then mixes (the rest fill by distance).
PRIORITY = (("depth",), ("mlp",), ("mlp", "hidden"), ("depth", "mlp"), ("heads", "hidden"), ("mlp", "heads"),
            ("depth", "mlp", "hidden"), ("depth", "heads"), ("mlp", "heads", "hidden"), ("hidden",))  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One uniform model shape and its exact parameter count."""

    layers: int
    hidden: int
    intermediate: int
    kv_groups: int
    heads: int
    params: int

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.layers, self.hidden, self.intermediate, self.kv_groups)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Origin:
    """The original model's shape and the facts the candidates are built from."""

    layers: int
    hidden: int
    intermediate: int
    kv_groups: int
    heads: int
    head_dim: int
    params: int

    def kind(self, shape: Shape) -> tuple[str, ...]:
        """Which dimensions `shape` cuts, in DIMS order."""
        cut = {"depth": shape.layers < self.layers, "mlp": shape.intermediate < self.intermediate,
               "heads": shape.kv_groups < self.kv_groups, "hidden": shape.hidden < self.hidden}  # fmt: skip
        return tuple(d for d in DIMS if cut[d])


def origin_of(loaded: LoadedModel) -> Origin:
    """The original's shape; ConfigError for models the search cannot reshape."""
    spec = arch_for(loaded)
    if spec.moe is not None or spec.head_dim_from_hidden:
        raise ConfigError(f"search reshapes dense decoders with a head_dim setting; {spec.family} is not one "
                          "(use compress --target params= or prune.depth / prune.width steps)")  # fmt: skip
    cfg = text_config(loaded.model)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    return Origin(int(cfg.num_hidden_layers), int(cfg.hidden_size), int(getattr(cfg, spec.intermediate_key)),
                  n_kv, n_heads, int(head_dim_of(cfg)), loaded.num_parameters())  # fmt: skip


def width_unit(origin: Origin) -> int:
    """64, or the head dimension when 64 would leave fewer than 4 widths (tiny models)."""
    return 64 if origin.hidden >= 4 * 64 and origin.intermediate >= 4 * 64 else origin.head_dim


def reshaped_config(config, origin: Origin, intermediate_key: str, layers: int, hidden: int, inter: int, kv: int):
    """A copy of the original's `config` at these sizes: heads follow the KV groups (the original's
    group size), the head dimension stays, per-layer types are cut or repeated to `layers`."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    group = origin.heads // origin.kv_groups
    values = {"num_hidden_layers": layers, "hidden_size": hidden, intermediate_key: inter,
              "num_attention_heads": kv * group, "num_key_value_heads": kv, "head_dim": origin.head_dim}  # fmt: skip
    for name, value in values.items():
        setattr(text, name, value)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = (text.layer_types * layers)[:layers]
    return config


class ParamCounter:
    """Exact parameter counts of reshaped configs (meta-device builds, nothing allocated)."""

    def __init__(self, loaded: LoadedModel, origin: Origin) -> None:
        self.config = loaded.model.config
        self.key = arch_for(loaded).intermediate_key
        self.origin = origin
        self.tied = bool(getattr(text_config(loaded.model), "tie_word_embeddings", False))
        self._coefficients = lru_cache(maxsize=None)(self._solve)

    def _build(self, layers: int, hidden: int, inter: int, kv: int) -> int:
        from transformers import AutoModelForCausalLM

        config = reshaped_config(self.config, self.origin, self.key, layers, hidden, inter, kv)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    def _solve(self, hidden: int, kv: int) -> tuple[int, int, int]:
        """(fixed, per-layer base, per-layer per-MLP-channel) counts at this hidden width and KV."""
        one, two = self._build(1, hidden, 64, kv), self._build(2, hidden, 64, kv)
        per_layer = two - one
        slope = (self._build(1, hidden, 128, kv) - one) // 64
        return one - per_layer, per_layer - 64 * slope, slope

    def count(self, layers: int, hidden: int, inter: int, kv: int) -> int:
        fixed, base, slope = self._coefficients(hidden, kv)
        return fixed + layers * (base + slope * inter)

    def mlp_for(self, target: float, layers: int, hidden: int, kv: int) -> float:
        """The (fractional) MLP width that reaches `target` parameters at this shape."""
        fixed, base, slope = self._coefficients(hidden, kv)
        return (target / layers - base - fixed / layers) / slope


def _hidden_options(loaded: LoadedModel, origin: Origin, unit: int, kv: int) -> list[int]:
    heads = kv * (origin.heads // origin.kv_groups)
    values = {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": origin.head_dim}
    low = max(unit, math.ceil(origin.hidden / 2 / unit) * unit)
    return [h for h in range(low, origin.hidden, unit) if config_problem(loaded, hidden_size=h, **values) is None] + [
        origin.hidden
    ]


def feasible_shapes(loaded: LoadedModel, keep: float, tolerance: float = TOLERANCE) -> tuple[Origin, list[Shape]]:
    """Every uniform shape within `tolerance` of `keep` x the original parameters."""
    origin = origin_of(loaded)
    unit = width_unit(origin)
    counter = ParamCounter(loaded, origin)
    target = keep * origin.params
    group = origin.heads // origin.kv_groups
    found: dict[tuple, Shape] = {}
    for kv in range(origin.kv_groups, max(1, math.ceil(origin.kv_groups / 2)) - 1, -1):
        for hidden in _hidden_options(loaded, origin, unit, kv):
            for layers in range(max(1, origin.layers // 4), origin.layers + 1):
                exact = counter.mlp_for(target, layers, hidden, kv)
                for inter in {math.floor(exact / unit) * unit, math.ceil(exact / unit) * unit, origin.intermediate}:
                    if not max(unit, origin.intermediate / 8) <= inter <= origin.intermediate:
                        continue
                    params = counter.count(layers, hidden, inter, kv)
                    if abs(params / target - 1) <= tolerance:
                        shape = Shape(layers, hidden, int(inter), kv, kv * group, params)
                        found[shape.key] = shape
    if not found:
        raise ConfigError(f"no uniform shape keeps {keep:.0%} of the parameters within ±{tolerance:.0%} "
                          f"(widths in multiples of {unit}); choose another --target params=")  # fmt: skip
    return origin, sorted(found.values(), key=lambda s: s.key, reverse=True)


def _normalized(origin: Origin, shape: Shape) -> tuple[float, ...]:
    return (shape.layers / origin.layers, shape.hidden / origin.hidden,
            shape.intermediate / origin.intermediate, shape.kv_groups / origin.kv_groups)  # fmt: skip


def _representative(origin: Origin, shapes: list[Shape], target: float) -> Shape:
    """The shape of a kind closest to the target, then the most even cut (smallest largest cut)."""
    return min(shapes, key=lambda s: (round(abs(s.params / target - 1), 3), 1 - min(_normalized(origin, s)), s.key))


def candidates(loaded: LoadedModel, keep: float, count: int = 8, tolerance: float = TOLERANCE) -> tuple[Origin, list[Shape]]:
    """At most `count` shapes spread over the space: one per kind of cut (PRIORITY order first),
    then the feasible shapes farthest from those already chosen (normalised widths)."""
    if count < 1:
        raise ConfigError(f"--candidates must be at least 1, got {count}")
    origin, shapes = feasible_shapes(loaded, keep, tolerance)
    target = keep * origin.params
    kinds: dict[tuple[str, ...], list[Shape]] = {}
    for shape in shapes:
        kinds.setdefault(origin.kind(shape), []).append(shape)
    order = [k for k in PRIORITY if k in kinds] + sorted(k for k in kinds if k not in PRIORITY)
    chosen = [_representative(origin, kinds[k], target) for k in order][:count]
    rest = [s for s in shapes if s not in chosen]
    while len(chosen) < count and rest:
        far = max(rest, key=lambda s: (min(math.dist(_normalized(origin, s), _normalized(origin, c)) for c in chosen), s.key))
        chosen.append(far)
        rest.remove(far)
    return origin, chosen


def shape_steps(origin: Origin, shape: Shape, blocks: int, depth_method: str = "block_influence") -> list[Step]:
    """The recipe steps that cut the original to `shape`: layers first (width scores then run on
    the kept layers only), then every width at once."""
    steps = []
    if shape.layers < origin.layers:
        steps.append(Step("prune.depth", {"count": origin.layers - shape.layers, "method": depth_method,
                                          "max_blocks": blocks}))  # fmt: skip
    widths = {"mlp_channels": (shape.intermediate, origin.intermediate), "kv_groups": (shape.kv_groups, origin.kv_groups),
              "hidden_size": (shape.hidden, origin.hidden)}  # fmt: skip
    cut = {name: new for name, (new, old) in widths.items() if new < old}
    if cut:
        steps.append(Step("prune.width", {**cut, "max_blocks": blocks}))
    return steps


def describe(origin: Origin, shape: Shape) -> str:
    """E.g. 'depth+mlp: 24 layers, hidden 576, MLP 1024, 3 KV groups (9 heads)'."""
    kind = "+".join(origin.kind(shape)) or "none"
    return (f"{kind}: {shape.layers} layers, hidden {shape.hidden}, MLP {shape.intermediate}, "
            f"{shape.kv_groups} KV groups ({shape.heads} heads)")  # fmt: skip
