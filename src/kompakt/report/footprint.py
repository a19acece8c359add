"""What running a model takes on a laptop, from measured peak memory and speed: the smallest
common RAM size that holds it, the power drawn (a stated assumption) and the energy per 1k
tokens or sentences. Shared by the decoder and encoder forms of the side-by-side table."""

from __future__ import annotations

import os

import torch

WATTS_PER_CORE = 10.0
GPU_WATTS = 300.0
RAM_TIERS_GB = (0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 128, 192, 256)


def hardware_needed(peak_bytes: float | None) -> str:
    """The smallest common RAM size that holds the peak with 25 % headroom for the OS and the app."""
    if not peak_bytes:
        return ""
    need = peak_bytes * 1.25 / 1e9
    tier = next((t for t in RAM_TIERS_GB if t >= need), RAM_TIERS_GB[-1])
    return f"{tier:g} GB RAM"


def power_watts(threads: int) -> tuple[float, str]:
    override = os.environ.get("KOMPAKT_WATTS")
    if override:
        return float(override), f"{float(override):g} W (KOMPAKT_WATTS)"
    if torch.cuda.is_available():
        return GPU_WATTS, f"{GPU_WATTS:g} W assumed for a GPU"
    return WATTS_PER_CORE * threads, f"{WATTS_PER_CORE:g} W per busy core assumed x {threads} threads"


def energy_per_1k(per_second: float | None, watts: float) -> float | None:
    """Joules per 1000 generated tokens (or embedded sentences) at `per_second` (watt-hours = J / 3600)."""
    return 1000.0 / per_second * watts if per_second else None
