"""The end of `compress --target`: each export is checked against the run's final model, never
against itself, so an export that differs from the model it was copied from is caught."""

from __future__ import annotations

import json
import shutil

import pytest

from kompakt.auto import deliver
from kompakt.export.check import ExportCheckError
from kompakt.model.tiny import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_corrupted_hf_copy_is_caught_and_recorded(tmp_path, monkeypatch):
    final = tmp_path / "run" / "steps" / "01-quant.rtn"
    save_tiny("llama", final)
    copy = shutil.copytree

    def copy_and_corrupt(source, destination, **kwargs):
        copied = copy(source, destination, **kwargs)
        save_tiny("llama", destination, seed=1)  # the export now holds another model's weights
        return copied

    monkeypatch.setattr(deliver.shutil, "copytree", copy_and_corrupt)
    exports, failure = deliver.export_result(final, "f16", tmp_path / "out")
    assert isinstance(failure, ExportCheckError) and "does not work in transformers" in str(failure)
    assert exports["hf_check"].startswith("FAILED") and "top-1 agreement" in exports["hf_check"]
    assert exports["hf"].endswith("hf.rejected") and (tmp_path / "out" / "export" / "hf.rejected").is_dir()
    assert not (tmp_path / "out" / "export" / "hf").exists()
    assert exports["gguf_check"].startswith(("passed", "not checked"))  # written from the final model, not the copy
    json.dumps(exports)  # what compress writes to exports.json
