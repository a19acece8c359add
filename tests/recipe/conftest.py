from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kompakt.model.tiny import save_tiny

# Tests import with --import-mode=importlib (no sys.path changes): make the helpers importable.
sys.path.insert(0, str(Path(__file__).parent))
from recipe_helpers import NOISE, write_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("session-tiny") / "llama"
    save_tiny("llama", directory)
    return directory


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("session-data") / "calib.txt")


@pytest.fixture
def test_passes(monkeypatch):
    from kompakt.passes import base

    base.registry()
    monkeypatch.setitem(base._REGISTRY, NOISE.name, NOISE)
