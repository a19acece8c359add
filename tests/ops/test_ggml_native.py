"""kompakt.ops.ggml_native: llama.cpp's own quantizer through ctypes, as GGUF export uses it when
llama-cpp-python is installed. It must write what the numpy encoders write (themselves tested
against the same library row by row in test_ggml_blocks32 / test_ggml_kquants) for every type,
also when a tensor is split into row chunks over several threads."""

from __future__ import annotations

import numpy as np
import pytest

from kompakt.ops import ggml_native, ggml_types

pytestmark = pytest.mark.skipif(not ggml_native.available(), reason="llama-cpp-python is not installed")


@pytest.mark.parametrize("name", [n for n in ggml_types.NAMES if n not in ("f32", "f16")])
def test_native_bytes_equal_numpy_in_chunks_on_threads(name, monkeypatch):
    monkeypatch.setattr(ggml_native, "CHUNK_VALUES", 4 * 512)  # 4 rows a call: many chunks, a short last one
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 512)) * 0.02).astype(np.float32)
    w[3] = 0.0  # an all-zero row
    w[5, :32] = 0.5  # ties of the largest magnitude
    t = ggml_types.ggml_type(name)
    native = ggml_native.quantize(w, int(ggml_types.gguf_enum(name)), t.row_bytes(512), threads=3)
    assert np.array_equal(native, ggml_types.numpy_quantize(w, name))
    assert np.array_equal(ggml_types.quantize(w, name, threads=1), native)  # the dispatch takes the native path


def test_rows_the_type_cannot_hold_keep_the_one_line_error():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml_types.quantize(np.zeros((2, 576), dtype=np.float32), "q6_k")
