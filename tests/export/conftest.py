"""Shared fixture of the export tests: a tiny llama saved as a HF directory, in a fresh cache and cwd."""

from __future__ import annotations

import pytest

from kompakt.model.tiny import save_tiny


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    save_tiny("llama", tmp_path / "tiny")
    return tmp_path / "tiny"
