"""kompakt's K-quant encoders write the bytes llama.cpp writes, on awkward inputs too.

The ground truth is ggml's own `ggml_quantize_chunk` from the libggml-base that
llama-cpp-python ships, called through ctypes by kompakt.ops.ggml_native (no imatrix:
llama-quantize's plain rounding).
"""

from __future__ import annotations


import numpy as np
import pytest

from kompakt.ops import ggml_native, ggml_types
from kompakt.ops.ggml_kquants import KQUANT_TYPES, quantize_kquant
from kompakt.ops.ggml_kquants_weighted import quantize_weighted

gguf = pytest.importorskip("gguf")


def ggml_bytes(w: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """What llama.cpp writes for float32 `w` [rows, cols] as `name`: uint8 [rows, row_bytes]."""
    if not ggml_native.available():
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    t = ggml_types.ggml_type(name)
    return ggml_native.quantize(w, int(ggml_types.gguf_enum(name)), t.row_bytes(w.shape[1]), importance=imatrix)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    with_zeros = rng.standard_normal((16, 512)).astype(np.float32)
    with_zeros[:, :40] = 0  # zero sub-blocks inside a live super-block
    with_zeros[3] = 0  # a whole zero row
    with_zeros[5, ::2] = 0
    outliers = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    outliers[:, 7] = 3.0  # one large weight per row, as LLM weights have
    return {
        "normal": rng.standard_normal((32, 512)).astype(np.float32),
        "student_t": rng.standard_t(2.0, (32, 512)).astype(np.float32),
        "with_zeros": with_zeros,
        "outliers": outliers,
        "constant": np.full((4, 512), 0.3, np.float32),
        "negative_constant": np.full((4, 512), -0.3, np.float32),
        "all_zero": np.zeros((2, 256), np.float32),
        "tiny": (rng.standard_normal((8, 512)) * 1e-6).astype(np.float32),
        "subnormal_scales": (rng.standard_normal((8, 256)) * 1e-9).astype(np.float32),
        "below_eps": (rng.standard_normal((4, 256)) * 1e-30).astype(np.float32),
        "positive_only": np.abs(rng.standard_normal((8, 256))).astype(np.float32) + 0.5,
    }


CASES = _cases()


@pytest.mark.parametrize("name", KQUANT_TYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_equal_llama_cpp(name, case):
    w = CASES[case]
    ours = ggml_types.numpy_quantize(w, name)  # the numpy encoders (export uses llama.cpp's when installed)
    ref = ggml_bytes(w, name)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    mismatch = np.argwhere(ours != ref)
    assert not len(mismatch), f"{len(mismatch)} bytes differ, first (row, byte): {mismatch[:4]}"


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_gguf_py_reads_our_bytes_back(name):
    w = CASES["normal"]
    deq = ggml_types.dequantize(quantize_kquant(w, name), name, w.shape)
    bits = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}[name]
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert deq.shape == w.shape and rel < 2.0 ** (1 - bits)  # the grid, not noise
    assert np.array_equal(ggml_types.fake_quantize(w, name), deq)


def _importances(cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mean_square = rng.chisquare(1.0, cols).astype(np.float32)  # like llama-imatrix's Σx²/n
    dead = mean_square.copy()
    dead[100:200] = 0  # columns no calibration token ever activated
    return {"chi2": mean_square, "with_dead_columns": dead, "uniform": np.ones(cols, np.float32)}


@pytest.mark.parametrize("name", KQUANT_TYPES)
@pytest.mark.parametrize("case", ["normal", "student_t", "with_zeros", "tiny", "constant"])
def test_imatrix_bytes_equal_llama_cpp(name, case):
    w = CASES[case]
    for kind, importance in _importances(w.shape[1]).items():
        ours = quantize_weighted(w, name, importance)
        assert np.array_equal(ours, ggml_bytes(w, name, importance)), kind


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_kquant(np.zeros((2, 576), np.float32), "q4_k")
    with pytest.raises(ValueError, match="importance has 256 values for rows of 512"):
        quantize_weighted(np.zeros((2, 512), np.float32), "q4_k", np.ones(256))


@pytest.fixture(scope="module")
def smollm2_down_proj() -> np.ndarray:
    """blk.0.ffn_down of the embedded SmolLM2 [576, 1536]: its rows take K-quants (reading
    the GGUF's tensor table takes seconds, hence slow and read once)."""
    from kompakt.model.embedded import embedded_gguf

    reader = gguf.GGUFReader(embedded_gguf("smollm2-135m"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.ascontiguousarray(w.reshape(576, 1536), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_real_down_proj_equals_llama_cpp(name, smollm2_down_proj):
    w = smollm2_down_proj
    assert np.array_equal(quantize_kquant(w, name), ggml_bytes(w, name))
    importance = _importances(w.shape[1])["chi2"]
    assert np.array_equal(quantize_weighted(w, name, importance), ggml_bytes(w, name, importance))


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_imatrix_lowers_the_importance_weighted_error(name):
    w = CASES["student_t"]
    importance = _importances(w.shape[1])["chi2"]

    def weighted_error(data: np.ndarray) -> float:
        return float((importance * (ggml_types.dequantize(data, name, w.shape) - w) ** 2).sum())

    plain = weighted_error(quantize_kquant(w, name))
    assert weighted_error(quantize_weighted(w, name, importance)) < plain
