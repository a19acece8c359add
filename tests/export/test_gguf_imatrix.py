"""`kompakt export --format gguf --imatrix FILE`: every tensor the importance matrix has an entry
for is rounded with it (the bytes of kompakt's own weighted encoders, which tests/ops checks
against ggml's), the others as without one; the file records the imatrix as llama-quantize does;
the streamed export writes the same file; another model's matrix is one line, exit 2, nothing
written. Byte identity with llama-quantize --imatrix itself: tests/export/test_imatrix_llamacpp.py."""

from __future__ import annotations

import numpy as np
import pytest

from kompakt.errors import ConfigError, DataError
from kompakt.export import export_gguf
from kompakt.export.api import export
from kompakt.export.imatrix_file import Entry, Imatrix, write_imatrix
from kompakt.model.progress import quiet_third_party
from kompakt.model.save import save_model
from kompakt.model.tiny import tiny_model
from kompakt.ops import ggml_native

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, wide_model_and_imatrix):
    """(a tiny llama with 256-wide rows, its imatrix file, the imatrix, an F32 GGUF of it)."""
    loaded, f32, imatrix, path = wide_model_and_imatrix(tmp_path_factory.mktemp("imatrix"))
    return loaded, path, imatrix, f32


def _numpy_weighted(w, kind: str, importance):
    """kompakt's own numpy encoders with an importance row (what the export must have written)."""
    if kind.endswith("_k"):
        from kompakt.ops.ggml_kquants_weighted import quantize_weighted
    else:
        from kompakt.ops.ggml_weighted32 import quantize_weighted
    return quantize_weighted(w, kind, importance)


def _tensors(path) -> dict[str, tuple[int, np.ndarray]]:
    return {t.name: (int(t.tensor_type), np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("type", ["q4_0", "q5_1", "iq4_nl", "q4_k", "q3_k"])
def test_entries_are_rounded_with_their_importance(tiny, tmp_path, type):
    loaded, path, imatrix, f32 = tiny
    weights = _tensors(f32)  # each tensor as the file holds it (q/k rows permuted)
    with_file = _tensors(export_gguf(loaded, tmp_path / "with.gguf", type=type, imatrix=path))
    without = _tensors(export_gguf(loaded, tmp_path / "without.gguf", type=type))
    assert set(imatrix.entries) < set(with_file)
    for name, (ggml, data) in with_file.items():
        assert ggml == without[name][0], name
        if name not in imatrix.entries:  # the embedding, the output and the norms: as without an imatrix
            assert np.array_equal(data, without[name][1]), name
            continue
        importance = imatrix.entries[name].importance()[0]
        kind = gguf.GGMLQuantizationType(ggml).name.lower()
        assert np.array_equal(data, _numpy_weighted(weights[name][1], kind, importance)), name
        assert not np.array_equal(data, without[name][1]), name


def test_the_file_records_the_imatrix_as_llama_quantize_does(tiny, tmp_path):
    loaded, path, imatrix, _ = tiny
    result = export(loaded, format="gguf", type="q4_0", out=tmp_path / "m.gguf", imatrix=path, verify=False)
    fields = gguf.GGUFReader(result.path).fields
    assert fields["quantize.imatrix.file"].contents() == "k.imatrix.gguf"  # its name, never a local path
    assert fields["quantize.imatrix.dataset"].contents() == "random.txt"
    assert fields["quantize.imatrix.entries_count"].contents() == len(imatrix.entries)
    assert fields["quantize.imatrix.chunks_count"].contents() == 4
    assert any("no entry in k.imatrix.gguf" in note and "token_embd.weight" in note for note in result.notes)


def test_without_llamacpp_the_numpy_encoders_write_the_same_file(tiny, tmp_path, monkeypatch):
    if not ggml_native.available():
        pytest.skip("llama-cpp-python is not installed: the numpy encoders are the only path")
    loaded, path, _, _ = tiny
    native = export_gguf(loaded, tmp_path / "native.gguf", type="q4_k", imatrix=path)
    monkeypatch.setattr(ggml_native, "available", lambda: False)
    numpy_only = export_gguf(loaded, tmp_path / "numpy.gguf", type="q4_k", imatrix=path)
    assert native.read_bytes() == numpy_only.read_bytes()


def test_streamed_export_writes_the_same_file(tiny, tmp_path, monkeypatch):
    loaded, path, _, _ = tiny
    monkeypatch.setenv("KOMPAKT_CACHE", str(tmp_path / "cache"))
    with quiet_third_party():
        save_model(loaded, tmp_path / "model")
    streamed = export(str(tmp_path / "model"), format="gguf", type="iq4_nl", out=tmp_path / "s.gguf", imatrix=path,
                      verify=False)  # fmt: skip
    memory = export_gguf(loaded, tmp_path / "m.gguf", type="iq4_nl", imatrix=path)
    assert _tensors(streamed.path).keys() == _tensors(memory).keys()
    for name, (ggml, data) in _tensors(streamed.path).items():
        assert ggml == _tensors(memory)[name][0] and np.array_equal(data, _tensors(memory)[name][1]), name


def test_expert_stacks_are_rounded_expert_by_expert(tmp_path):
    """llama-imatrix keeps one row per expert for an expert stack ([experts, cols]); each expert's
    rows are rounded with its own."""
    loaded = tiny_model("mixtral", hidden_size=256, intermediate_size=256, head_dim=64)
    loaded.name = "tiny"
    weights = _tensors(export_gguf(loaded, tmp_path / "f32.gguf", type="f32"))
    name = "blk.0.ffn_up_exps.weight"
    experts = weights[name][1].shape[0]
    rng = np.random.default_rng(0)
    sums = rng.lognormal(0, 2, (experts, 256)).astype(np.float32)
    imatrix = Imatrix({name: Entry(sums, np.full(experts, 10.0, dtype=np.float32))}, ["random.txt"], 1, 10)
    path = write_imatrix(imatrix, tmp_path / "moe.imatrix.gguf")
    data = _tensors(export_gguf(loaded, tmp_path / "q.gguf", type="q4_0", imatrix=path))[name][1]
    importance = imatrix.entries[name].importance()
    for expert in range(experts):
        wanted = _numpy_weighted(weights[name][1][expert], "q4_0", importance[expert])
        assert np.array_equal(data[expert], wanted), expert


def test_another_models_imatrix_is_one_line_and_writes_nothing(tiny, tmp_path):
    _, path, _, _ = tiny
    other = tiny_model("llama")  # 64-wide rows
    other.name = "other"
    with pytest.raises(DataError, match="imatrix of another model: blk.0.attn_k.weight has 256 inputs"):
        export(other, format="gguf", type="q4_0", out=tmp_path / "o.gguf", imatrix=path, verify=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_imatrix_options_are_refused_before_loading(tiny_dir, tmp_path, cli):
    code, _, err = cli(["export", str(tiny_dir), "--type", "q4_0", "--imatrix", str(tmp_path / "no.gguf")])
    assert code == 2 and "does not exist; write one with `kompakt imatrix MODEL`" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="--imatrix rounds GGUF tensors; use it with --format gguf, not hf"):
        export(str(tiny_dir), format="hf", imatrix=tmp_path / "k.imatrix.gguf")
    assert not list(tiny_dir.parent.glob("tiny-*"))
