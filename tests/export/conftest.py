"""Shared fixtures of the export tests: a tiny llama saved as a HF directory, in a fresh cache and cwd;
the model and importance matrix the imatrix export tests quantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.export import export_gguf
from kompakt.export.imatrix import imatrix_from_blocks
from kompakt.export.imatrix_file import Imatrix, write_imatrix
from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import save_tiny, tiny_model


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    save_tiny("llama", tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="session")
def wide_model_and_imatrix():
    """A builder: a tiny llama with 256-wide rows (the K-quants fit) and an importance matrix for it
    whose channel importance is as uneven as real activations' (random tokens give nearly flat
    sums, and then the weighting barely matters)."""
    return _wide_model_and_imatrix


def _wide_model_and_imatrix(directory: Path) -> tuple[LoadedModel, Path, Imatrix, Path]:
    """(the model, its F32 GGUF, its imatrix, that imatrix written as directory/k.imatrix.gguf)."""
    loaded = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    loaded.name = "tiny"
    model_file = export_gguf(loaded, directory / "m.gguf", type="f32")
    blocks = torch.randint(3, 261, (4, 64), generator=torch.Generator().manual_seed(0))
    imatrix = imatrix_from_blocks(loaded, blocks, dataset="random.txt")
    rng = np.random.default_rng(0)
    for entry in imatrix.entries.values():
        entry.sums = entry.sums * rng.lognormal(0, 2, entry.sums.shape).astype(np.float32)
    return loaded, model_file, imatrix, write_imatrix(imatrix, directory / "k.imatrix.gguf")
