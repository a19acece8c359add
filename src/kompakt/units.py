"""How kompakt writes quantities for people (CLI lines, reports, error messages)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """Seconds as the unit a person reads at a glance: "1 s", "45.3 s", "2.5 min", "1.2 h"."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip


def parse_size(text: str | int | float, option: str = "size") -> int:
    """"6GB", "6 GiB", "512MB", "1.5g", 2_000_000 -> bytes (decimal units as disks and `free -h
    --si` count, binary ones with an i). ValueError with the accepted forms, for the caller to
    turn into its own one-line error (`option` names the flag)."""
    import re

    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"{option} {text!r}: write a size like 6GB, 512MB or 8GiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"{option} {text!r}: a size must be positive")
    return int(value * _SIZE_UNITS[unit])


def parse_memory(text: str | int | float | None, option: str = "--max-memory") -> int | None:
    """parse_size for a memory option given on the command line or in the API: None stays None
    (no budget), a bad size is a one-line ConfigError naming `option`."""
    from kompakt.errors import ConfigError

    if text is None:
        return None
    try:
        return parse_size(text, option)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def size(n: int | float) -> str:
    """Bytes as a person reads them: "812 MB", "13.5 GB" (decimal units, as parse_size reads them)."""
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"
