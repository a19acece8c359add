"""CLI: the expert passes through `kompakt compress` on a tiny MoE: a plan that keeps fewer experts
than top-k is one line and exit 2 with nothing written; a valid one saves a loadable model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kompakt.model.tiny import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipe"))
from recipe_helpers import write_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_expert_passes_in_compress(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    save_tiny("mixtral", tmp_path / "moe")
    text = write_text(tmp_path / "calib.txt")
    common = ("compress", str(tmp_path / "moe"), "--data", str(text))
    code, out, err = cli([*common, "--step", "moe.prune:count=3", "--out", str(tmp_path / "bad")])
    assert code == 2 and "fewer than top-k 2" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("*/config.json"))
    code, _, err = cli([*common, "--step", "moe.prune:fraction=0.5,method=reap", "--step", "moe.topk:top_k=1",
                         "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 1
