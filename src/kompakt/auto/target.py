"""What the user wants from `kompakt compress --target`: a goal (size, parameters, bytes, speed)
and a quality floor (max KL, max perplexity ratio), parsed and checked before any work starts.

    size=4x            4x fewer bytes than the original stored in fp16 (the usual reference)
    bytes=300MB        at most this many bytes on disk (B, KB, MB, GB; decimal units)
    params=0.5         keep at most this fraction of the parameters (structured pruning)
    speed=3x           3x the generation tokens/s of the original (fp16 weights, same runtime)
    max-kl=0.15        quality floor: mean KL(original || result) on held-out text
    max-ppl-ratio=1.2  quality floor: perplexity(result) / perplexity(original)
    min-cosine=0.95    quality floor of sentence encoders: mean cosine of the result's and the
                       original's embeddings of held-out sentences (kompakt.auto.encoder)

Items are comma-separated (`size=4x,max-kl=0.1`). The default target is `size=4x,max-kl=0.15`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from kompakt.errors import ConfigError

DEFAULT_TARGET = "size=4x,max-kl=0.15"
DEFAULT_MAX_KL = 0.15
# What compression can reach at all: 2-bit weights (+ scales, ~2.5 bits) on a quarter of the
# parameters is ~25x fewer bytes than fp16; beyond that nothing of the model is left to use.
MAX_SIZE_FACTOR = 16 / 2.5 / 0.25
MIN_PARAMS_FRACTION = 0.1
MAX_SPEED_FACTOR = 16.0
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_KEYS = ("size", "bytes", "params", "speed", "max-kl", "max-ppl-ratio", "min-cosine")
FLOOR_KEYS = ("max_kl", "max_ppl_ratio", "min_cosine")


@dataclass(frozen=True)
class Target:
    """A parsed target; None = not asked for. Floors default to max_kl = 0.15 when none is given."""

    size: float | None = None  # factor vs the original's fp16 bytes
    bytes: int | None = None
    params: float | None = None  # fraction of the original's parameters to keep
    speed: float | None = None  # factor vs the original's generation tokens/s
    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_cosine: float | None = None  # sentence encoders only
    text: str = DEFAULT_TARGET

    @property
    def goal(self) -> str:
        """The kind of goal: size (size or bytes), params, speed, or floor (only a floor given)."""
        if self.params is not None:
            return "params"
        if self.speed is not None:
            return "speed"
        if self.size is not None or self.bytes is not None:
            return "size"
        return "floor"

    def size_factor(self, fp16_bytes: int) -> float | None:
        """The size goal as a factor vs fp16 bytes (bytes= converted), or None."""
        if self.bytes is not None:
            return fp16_bytes / self.bytes
        return self.size

    def to_dict(self) -> dict:
        return asdict(self)


def _factor(key: str, value: str) -> float:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*x?", value.strip().lower())
    if not match:
        raise ConfigError(f"--target {key}={value}: write a factor like {key}=4x")
    return float(match.group(1))


def _bytes(value: str) -> int:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", value.strip().lower())
    if not match or match.group(2) not in ("", *_UNITS):
        raise ConfigError(f"--target bytes={value}: write a size like bytes=300MB (units B, KB, MB, GB, MiB, GiB)")
    return int(float(match.group(1)) * _UNITS.get(match.group(2) or "b"))


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--target {key}={value}: expected a number") from None


def parse_target(text: str | None) -> Target:
    """Parse `--target`; raises ConfigError (one line) for syntax and for goals impossible in principle."""
    text = (text or DEFAULT_TARGET).strip()
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not eq or key not in _KEYS:
            raise ConfigError(f"--target {item!r}: expected key=value with key one of {', '.join(_KEYS)}")
        if key in ("size", "speed"):
            values[key] = _factor(key, value)
        elif key == "bytes":
            values[key] = _bytes(value)
        else:
            values[key.replace("-", "_")] = _number(key, value)
    if values.get("size") is not None and values.get("bytes") is not None:
        raise ConfigError("--target: give size= or bytes=, not both")
    if not any(key in values for key in FLOOR_KEYS):
        values["max_kl"] = DEFAULT_MAX_KL
    if not any(key in values for key in ("size", "bytes", "params", "speed")):
        values["size"] = 4.0  # a floor alone: the smallest model within it, aiming at 4x
    target = Target(**values, text=text)
    _check_possible(target)
    return target


def _check_possible(target: Target) -> None:
    if target.size is not None and not 1.0 < target.size <= MAX_SIZE_FACTOR:
        raise ConfigError(
            f"--target size={target.size:g}x cannot be met in principle: choose a factor above 1 and at most "
            f"{MAX_SIZE_FACTOR:g}x (2-bit weights on a quarter of the parameters)"
        )
    if target.bytes is not None and target.bytes <= 0:
        raise ConfigError("--target bytes= must be positive")
    if target.params is not None and not MIN_PARAMS_FRACTION <= target.params < 1:
        raise ConfigError(
            f"--target params={target.params:g}: give the fraction of parameters to keep, "
            f"in [{MIN_PARAMS_FRACTION}, 1)"
        )
    if target.speed is not None and not 1.0 < target.speed <= MAX_SPEED_FACTOR:
        raise ConfigError(f"--target speed={target.speed:g}x: choose a factor above 1 and at most {MAX_SPEED_FACTOR:g}x")
    if target.max_kl is not None and target.max_kl <= 0:
        raise ConfigError(
            f"--target max-kl={target.max_kl:g} is violated by the original against itself (its KL is 0); "
            "give a positive bound such as max-kl=0.15"
        )
    if target.min_cosine is not None and not 0 < target.min_cosine < 1:
        raise ConfigError(f"--target min-cosine={target.min_cosine:g}: give a bound in (0, 1) such as min-cosine=0.95")
    if target.max_ppl_ratio is not None and target.max_ppl_ratio <= 1.0:
        raise ConfigError(
            f"--target max-ppl-ratio={target.max_ppl_ratio:g} is violated by the original against itself "
            "(its ratio is 1); give a bound above 1 such as max-ppl-ratio=1.2"
        )


def check_bytes_possible(target: Target, fp16_bytes: int) -> None:
    """bytes= can only be judged once the model's size is known."""
    factor = target.size_factor(fp16_bytes)
    if target.bytes is not None and factor is not None and not 1.0 < factor <= MAX_SIZE_FACTOR:
        raise ConfigError(
            f"--target bytes={target.bytes / 1e6:.1f}MB is {factor:.3g}x the original's fp16 size "
            f"({fp16_bytes / 1e6:.1f} MB); it must be smaller than that and at most {MAX_SIZE_FACTOR:g}x smaller"
        )


def parse_budget(text: str | None) -> float | None:
    """`--budget 30m` / `90s` / `2h` / `45` (minutes) -> seconds; None = no budget."""
    if text is None:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|m|min|h)?", text.strip().lower())
    if not match:
        raise ConfigError(f"--budget {text!r}: write a wall-clock time like 30m, 90s or 2h")
    scale = {"s": 1, "m": 60, "min": 60, "h": 3600, None: 60}[match.group(2)]
    seconds = float(match.group(1)) * scale
    if seconds <= 0:
        raise ConfigError("--budget must be positive")
    return seconds
