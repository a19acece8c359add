"""--target and --budget parsing: every accepted form, and one-line errors for the rest."""

from __future__ import annotations

import pytest

from kompakt.errors import ConfigError
from kompakt.auto.target import check_bytes_possible, parse_budget, parse_target


def test_default_target_is_4x_with_kl_floor():
    target = parse_target(None)
    assert (target.size, target.max_kl, target.goal) == (4.0, 0.15, "size")


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("size=4x", "size", 4.0),
        ("size=2.5", "size", 2.5),
        ("params=0.5", "params", 0.5),
        ("bytes=300MB", "bytes", 300_000_000),
        ("bytes=1GiB", "bytes", 1024**3),
        ("speed=3x", "speed", 3.0),
        ("max-kl=0.1", "max_kl", 0.1),
        ("size=3x,max-ppl-ratio=1.2", "max_ppl_ratio", 1.2),
    ],
)
def test_accepted_forms(text, field, value):
    assert getattr(parse_target(text), field) == value


def test_floor_alone_aims_at_the_smallest_model_within_it():
    target = parse_target("max-kl=0.05")
    assert target.max_kl == 0.05 and target.size == 4.0


def test_ppl_floor_replaces_the_default_kl_floor():
    target = parse_target("size=2x,max-ppl-ratio=1.3")
    assert target.max_kl is None and target.max_ppl_ratio == 1.3


@pytest.mark.parametrize(
    "text, message",
    [
        ("size=1000x", "cannot be met in principle"),
        ("size=0.5x", "cannot be met in principle"),
        ("params=1.5", "fraction of parameters to keep"),
        ("params=0", "fraction of parameters to keep"),
        ("speed=100x", "at most"),
        ("max-kl=0", "violated by the original against itself"),
        ("max-ppl-ratio=0.9", "violated by the original against itself"),
        ("size=4x,bytes=1MB", "not both"),
        ("smaller=yes", "expected key=value"),
        ("size=big", "write a factor"),
        ("bytes=12 parsecs", "write a size"),
    ],
)
def test_rejected_targets(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_target(text)


def test_bytes_larger_than_the_model_is_impossible():
    with pytest.raises(ConfigError, match="original's fp16 size"):
        check_bytes_possible(parse_target("bytes=1GB"), fp16_bytes=270_000_000)
    check_bytes_possible(parse_target("bytes=100MB"), fp16_bytes=270_000_000)


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("90s", 90), ("2h", 7200), ("45", 2700), ("1.5min", 90)])
def test_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_bad_budget(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)
