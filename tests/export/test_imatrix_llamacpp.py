"""kompakt's importance matrices against llama.cpp's own tools (built by bench/peers/llamacpp_tools.sh):
llama-imatrix's file reads back through kompakt, llama-quantize --imatrix accepts kompakt's and
quantizes differently with it, and both compute the same statistics on the same tokens."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.export import export_gguf
from kompakt.export.imatrix import gguf_linear_names, imatrix_from_blocks, read_importance
from kompakt.export.imatrix_file import read_imatrix
from kompakt.model.tiny import tiny_model

BIN = Path(os.environ.get("KOMPAKT_PEERS", Path.home() / ".cache" / "kompakt" / "peers")) / "llamacpp-0.3.36" / "bin"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not (BIN / "llama-imatrix").is_file() or not (BIN / "llama-quantize").is_file(),
        reason=f"llama.cpp's tools are not built in {BIN}: run bench/peers/llamacpp_tools.sh",
    ),
]
CTX, CHUNKS = 64, 4
# Per-channel relative tolerance between llama-imatrix's Σ x² and kompakt's on the same tokens:
# llama.cpp keeps the KV cache in F16, so the attention outputs (and all that follows) differ
# in the 4th digit (measured worst: 6e-4 on the tiny llama).
RTOL = 5e-3


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([str(BIN / name), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A tiny llama as an F32 GGUF, a calibration text, and llama-imatrix's file for them."""
    tmp = tmp_path_factory.mktemp("peer")
    loaded = tiny_model("llama")
    loaded.name = "tiny"
    model_file = export_gguf(loaded, tmp / "m.gguf", type="f32")
    text = tmp / "calib.txt"
    text.write_text("The cat sat on the mat, and the dog lay by the door. " * 20 + "Numbers: 1 2 3 4 5 6 7 8 9. " * 20)
    out = tmp / "llama.imatrix.gguf"
    _tool("llama-imatrix", "-m", str(model_file), "-f", str(text), "-o", str(out), "-c", str(CTX), "-b", str(CTX),
          "-ub", str(CTX), "--chunks", str(CHUNKS), "-t", "1", "--no-ppl")  # fmt: skip
    return loaded, model_file, text, out


def test_llama_imatrix_reads_back(peer):
    loaded, _, text, made = peer
    imatrix = read_imatrix(made)
    assert (imatrix.chunk_count, imatrix.chunk_size, imatrix.datasets) == (CHUNKS, CTX, [str(text)])
    importance = read_importance(made, loaded)
    assert set(importance) == set(gguf_linear_names(loaded.model))
    assert all(value.shape == (loaded.model.get_submodule(name).in_features,) for name, value in importance.items())


def test_same_statistics_on_the_same_tokens(peer):
    """The tokens llama-imatrix sees (its tokenizer, its chunks, BOS where the vocabulary adds one),
    run through kompakt: counts equal, sums within RTOL per channel."""
    import llama_cpp

    loaded, model_file, text, made = peer
    llm = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.read_text().encode(), add_bos=True, special=False)  # as common_tokenize
        bos = llm.token_bos() if len(llm.tokenize(b"a", add_bos=True)) == 2 else None
    finally:
        llm.close()
    blocks = torch.tensor(ids[: CHUNKS * CTX]).reshape(CHUNKS, CTX)
    if bos is not None:
        blocks[:, 0] = bos  # llama-imatrix puts BOS first in every chunk
    ours = imatrix_from_blocks(loaded, blocks, dataset="calib.txt").entries
    theirs = read_imatrix(made).entries
    assert set(ours) == set(theirs)
    for name, entry in ours.items():
        assert theirs[name].counts.tolist() == entry.counts.tolist() == [CHUNKS * CTX]
        np.testing.assert_allclose(theirs[name].sums, entry.sums, rtol=RTOL, err_msg=name)


def test_llama_quantize_takes_kompakts_imatrix(tmp_path, wide_model_and_imatrix):
    """Q4_K on 256-wide rows (no fallback type): with kompakt's imatrix llama-quantize loads every
    entry and writes different blocks than without one."""
    import gguf

    _, model_file, imatrix, matrix = wide_model_and_imatrix(tmp_path)
    log = _tool("llama-quantize", "--imatrix", str(matrix), str(model_file), str(tmp_path / "with.gguf"), "Q4_K_M", "1")
    assert f"loaded {len(imatrix.entries)} importance matrix entries" in log
    _tool("llama-quantize", str(model_file), str(tmp_path / "without.gguf"), "Q4_K_M", "1")

    def q_proj(path: Path) -> tuple[int, bytes]:
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
        return int(tensor.tensor_type), tensor.data.tobytes()

    with_type, with_bytes = q_proj(tmp_path / "with.gguf")
    without_type, without_bytes = q_proj(tmp_path / "without.gguf")
    assert with_type == without_type == gguf.GGMLQuantizationType.Q4_K
    assert with_bytes != without_bytes


@pytest.mark.parametrize(("llama_type", "ours"), [("Q4_0", "q4_0"), ("IQ4_NL", "iq4_nl"), ("Q4_K_M", "q4_k")])
def test_export_with_an_imatrix_writes_llama_quantizes_bytes(tmp_path, wide_model_and_imatrix, llama_type, ours):
    """`kompakt export --imatrix` against `llama-quantize --imatrix` on the same F32 GGUF and the
    same file: every tensor both give the same type is byte-identical (Q4_K_M moves some tensors
    to Q6_K by its own mix rules; kompakt's q4_k keeps them, so those are not compared)."""
    import gguf

    loaded, model_file, imatrix, matrix = wide_model_and_imatrix(tmp_path)
    _tool("llama-quantize", "--imatrix", str(matrix), str(model_file), str(tmp_path / "theirs.gguf"), llama_type, "1")
    mine = export_gguf(loaded, tmp_path / "ours.gguf", type=ours, imatrix=matrix)

    def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
        return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}

    theirs, kompakt = tensors(tmp_path / "theirs.gguf"), tensors(mine)
    assert theirs.keys() == kompakt.keys()
    same_type = [name for name in theirs if theirs[name][0] == kompakt[name][0]]
    assert set(imatrix.entries) & set(same_type)
    for name in same_type:
        assert theirs[name][1] == kompakt[name][1], name
    if llama_type != "Q4_K_M":
        assert len(same_type) == len(theirs)
