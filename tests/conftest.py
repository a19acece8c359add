"""Shared fixtures: tiny models of every family (built in code) and the shared evaluation text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext2"


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    """WikiText-2 test split beside the checkout (../shared); skip where it is absent."""
    path = SHARED_DATA / "wiki.test.raw"
    if not path.exists():
        pytest.skip("../shared/data/wikitext2 not found beside the checkout")
    return path


@pytest.fixture
def one_thread():
    """One torch thread: tiny matrices and column-by-column solvers run faster (much faster on a
    loaded machine); the previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """Run the kompakt CLI in this process: cli(argv) -> (exit code, stdout, stderr)."""
    from kompakt.cli.app import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = 0
        try:
            main(argv)
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run
