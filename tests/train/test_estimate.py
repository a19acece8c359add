"""Training-time estimates scale with tokens and parameters as the FLOP count says."""

from __future__ import annotations

import pytest

from kompakt.train.estimate import achieved_flops, estimate_seconds, flops_per_token


def test_flops_and_estimates():
    assert flops_per_token(100, 200) == 6 * 100 + 2 * 200
    assert flops_per_token(100, lora=True) == 400
    machine = achieved_flops(50.0, 100_000_000, 135_000_000)  # 50 tok/s measured
    assert estimate_seconds(5000, 100_000_000, 135_000_000, machine) == pytest.approx(100.0)
    assert estimate_seconds(5000, 200_000_000, 270_000_000, machine) == pytest.approx(200.0)
