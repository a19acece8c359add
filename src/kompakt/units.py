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
