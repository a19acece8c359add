"""llama.cpp importance matrices: kompakt writes them (GGUF, legacy .dat) and reads them back as
per-module importance; another model's file, a truncated one or garbage is one line, exit 2."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from kompakt.errors import DataError
from kompakt.export.imatrix import gguf_linear_names, imatrix_from_blocks, read_importance
from kompakt.export.imatrix_file import Entry, Imatrix, read_imatrix, write_imatrix
from kompakt.model.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = torch.randint(3, 261, (3, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def computed(tiny):
    return imatrix_from_blocks(tiny, BLOCKS, dataset="probe.txt", batch_size=2)




def test_names_and_counts_are_llama_imatrix_s(tiny, computed):
    assert set(computed.entries) == set(gguf_linear_names(tiny.model).values())
    assert "blk.3.ffn_down.weight" in computed.entries and "output.weight" not in computed.entries
    down = computed.entries["blk.0.ffn_down.weight"]
    assert down.sums.shape == (1, 128) and down.counts.tolist() == [BLOCKS.numel()]
    assert (computed.chunk_count, computed.chunk_size, computed.datasets) == (3, 32, ["probe.txt"])


def test_sums_are_each_linear_s_own_squared_inputs(tiny, computed):
    """The values: Σ x² per input channel of the Linear the GGUF name stands for (attn_q and
    attn_output are both 64 wide here, so a swapped name mapping shows only in the values)."""
    layer = tiny.model.model.layers[0]
    seen: dict[str, torch.Tensor] = {}

    def add_squares(key: str):
        def hook(module, args):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            seen[key] = seen.get(key, 0) + x.pow(2).sum(0)

        return hook

    modules = {"attn_q": layer.self_attn.q_proj, "attn_output": layer.self_attn.o_proj, "ffn_down": layer.mlp.down_proj}
    hooks = [module.register_forward_pre_hook(add_squares(key)) for key, module in modules.items()]
    try:
        with torch.no_grad():
            tiny.model(input_ids=BLOCKS)
    finally:
        for hook in hooks:
            hook.remove()
    for key, sums in seen.items():
        np.testing.assert_allclose(computed.entries[f"blk.0.{key}.weight"].sums[0], sums.numpy(), rtol=1e-4)


def test_gguf_layout_is_llama_cpp_s(computed, tmp_path):
    import gguf

    path = write_imatrix(computed, tmp_path / "m.imatrix.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.chunk_size"].contents() == 32
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = tensors["blk.1.attn_q.weight.in_sum2"], tensors["blk.1.attn_q.weight.counts"]
    assert sums.shape.tolist() == [64, 1] and counts.shape.tolist() == [1, 1]  # ggml ne order
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert [t.name for t in reader.tensors][:2] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts"]


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_both_formats_read_back_to_the_same_importance(tiny, computed, tmp_path, suffix):
    path = write_imatrix(computed, tmp_path / f"m{suffix}")
    assert path.read_bytes()[:4] == b"GGUF" if suffix == ".gguf" else path.read_bytes()[:4] != b"GGUF"
    back = read_imatrix(path)
    assert back.legacy == (suffix == ".dat") and back.chunk_count == 3 and back.datasets == ["probe.txt"]
    importance = read_importance(path, tiny)
    name = "model.layers.2.mlp.down_proj"
    expected = computed.entries["blk.2.ffn_down.weight"].sums[0] / BLOCKS.numel()
    np.testing.assert_allclose(importance[name].numpy(), expected, rtol=1e-6)
    assert set(importance) == set(gguf_linear_names(tiny.model))


def test_dat_values_are_scaled_by_chunk_calls(tmp_path):
    """Legacy values are mean x² times ncall (the count in chunks, rounded up), as llama.cpp writes."""
    entry = Entry(np.array([[10.0, 20.0]], dtype=np.float32), np.array([100]))
    path = write_imatrix(Imatrix({"blk.0.attn_q.weight": entry}, ["d"], 2, 64), tmp_path / "x.dat")
    data = path.read_bytes()
    n, length = struct.unpack_from("<ii", data)
    ncall, nval = struct.unpack_from("<ii", data, 8 + length)
    values = np.frombuffer(data, "<f4", nval, 16 + length)
    assert (n, ncall, nval) == (1, 2, 2)
    np.testing.assert_allclose(values, [0.2, 0.4])
    np.testing.assert_allclose(read_imatrix(path).entries["blk.0.attn_q.weight"].importance(), [[0.1, 0.2]])


def test_unseen_matrices_read_as_one(tmp_path):
    entry = Entry(np.ones((2, 3), dtype=np.float32), np.array([0, 4]))
    np.testing.assert_allclose(entry.importance(), [[1, 1, 1], [0.25, 0.25, 0.25]])


def test_another_models_imatrix_is_refused(computed, tmp_path):
    path = write_imatrix(computed, tmp_path / "m.gguf")
    with pytest.raises(DataError, match="another model: blk.0.attn_k.weight has 64 inputs"):
        read_importance(path, tiny_model("llama", hidden_size=32, head_dim=8))
    with pytest.raises(DataError, match="another model: it has 7 tensors this model lacks"):
        read_importance(path, tiny_model("llama", num_hidden_layers=3))


@pytest.mark.parametrize("cut", [3, 40, 200, -600, -3])
def test_truncated_files_are_refused(computed, tmp_path, cut):
    for suffix in (".gguf", ".dat"):
        data = write_imatrix(computed, tmp_path / f"m{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[:cut])
        with pytest.raises(DataError, match="not a readable llama.cpp imatrix"):
            read_imatrix(tmp_path / f"cut{suffix}")


def test_garbage_and_model_files_are_refused(tiny, tmp_path):
    from kompakt.export import export_gguf

    (tmp_path / "g.dat").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="not a readable llama.cpp imatrix"):
        read_imatrix(tmp_path / "g.dat")
    entry = struct.pack("<i", 5) + b"hello" + struct.pack("<ii", 1, 2) + struct.pack("<ff", 1.0, 2.0)
    (tmp_path / "short.dat").write_bytes(struct.pack("<i", 2) + entry + entry[:-4])  # second entry cut
    with pytest.raises(DataError, match="truncated"):
        read_imatrix(tmp_path / "short.dat")
    model_file = export_gguf(tiny, tmp_path / "model.gguf", type="f32")
    with pytest.raises(DataError, match="without imatrix tensors"):
        read_imatrix(model_file)
    with pytest.raises(DataError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")


def test_cli_writes_converts_and_refuses_in_one_line(tiny_dir, cli):
    text = tiny_dir.parent / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, _ = cli(["imatrix", str(tiny_dir), "--data", str(text), "--blocks", "4", "--block-len", "64"])
    assert code == 0 and "4 x 64 tokens of calib.txt" in out
    made = tiny_dir.parent / "tiny.imatrix.gguf"
    assert read_imatrix(made).entries["blk.0.ffn_up.weight"].counts.tolist() == [256]

    code, out, _ = cli(["imatrix", str(tiny_dir), "--imatrix", str(made), "--out", "legacy.dat"])
    assert code == 0 and "converted from" in out
    assert read_imatrix(tiny_dir.parent / "legacy.dat").legacy

    code, _, err = cli(["imatrix", str(tiny_dir), "--data", str(text), "--blocks", "4", "--block-len", "64"])
    assert code == 2 and "exists; pass --force" in err and len(err.strip().splitlines()) == 1
    (tiny_dir.parent / "bad.dat").write_bytes(b"\xff" * 64)
    code, _, err = cli(["imatrix", str(tiny_dir), "--imatrix", "bad.dat", "--out", "x.gguf"])
    assert code == 2 and "not a readable llama.cpp imatrix" in err and len(err.strip().splitlines()) == 1
    assert not (tiny_dir.parent / "x.gguf").exists()
