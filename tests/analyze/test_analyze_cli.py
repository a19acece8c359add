"""`kompakt analyze` on a tiny model saved to disk, with a small text file as data."""

from __future__ import annotations

import json
import random

import pytest

from kompakt.cli.app import main
from kompakt.model.tiny import save_tiny

SMALL = ["--tokens", "1024", "--blocks", "2", "--block-len", "32", "--eval-tokens", "64", "--window", "32", "--no-speed"]


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as done:
        return done.code or 0
    return 0


@pytest.fixture(scope="module")
def tiny_dir_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny("llama", root / "model")
    words = ["alpha", "beta", "gamma", "delta", "kompakt", "layer", "model", "small"]
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(60))
    (root / "data.txt").write_text(text)
    return root


def test_cli_json_and_files(tiny_dir_and_data, capsys):
    root = tiny_dir_and_data
    out = root / "out"
    args = ["analyze", str(root / "model"), "--data", str(root / "data.txt"), "--out", str(out), "--json", *SMALL]
    assert _run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["layers"]) == 4
    assert result["settings"]["heldout"]["tokens"] == 64
    assert "in_file" in result["channels"]
    assert (out / "analysis.json").exists() and (out / "analysis.html").exists()


def test_cli_tables(tiny_dir_and_data, capsys):
    root = tiny_dir_and_data
    assert _run(["analyze", str(root / "model"), "--data", str(root / "data.txt"), "--out", str(root / "out2"), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "Where to cut" in text and "block infl." in text and "analysis.html" in text


def test_cli_out_into_file_is_one_line_error(tiny_dir_and_data, capsys):
    root = tiny_dir_and_data
    assert _run(["analyze", str(root / "model"), "--data", str(root / "data.txt"), "--out", str(root / "data.txt" / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "--out" in err and len(err.splitlines()) == 1
