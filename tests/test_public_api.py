"""The curated API works as the README shows it, also after every subpackage has been imported
(importing `kompakt.analyze` rebinds the attribute `kompakt.analyze` to the package)."""

from __future__ import annotations

import importlib
import pkgutil

import torch

import kompakt


def _import_every_module() -> None:
    for info in pkgutil.walk_packages(kompakt.__path__, prefix="kompakt."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)


def test_readme_python_section_after_importing_everything(tmp_path, monkeypatch):
    from kompakt.model.tiny import save_tiny

    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    _import_every_module()
    for name in kompakt.__all__:
        assert getattr(kompakt, name) is not None
    save_tiny("llama", tmp_path / "tiny")
    loaded = kompakt.load(str(tmp_path / "tiny"))
    ids = torch.randint(0, 256, (3000,))
    result = kompakt.evaluate(loaded, ids=ids, window=128)
    assert result.to_dict()["ppl"] > 1
    analysis = kompakt.analyze(loaded, ids, out=tmp_path / "report")
    assert (tmp_path / "report").is_dir() and analysis is not None
    path = kompakt.export(loaded, format="gguf", type="q8_0", out=tmp_path / "small.gguf")
    assert path is not None and (tmp_path / "small.gguf").read_bytes()[:4] == b"GGUF"
    pieces = list(kompakt.stream_generate(loaded, [{"role": "user", "content": "Hi"}], max_new_tokens=3))
    assert pieces is not None
