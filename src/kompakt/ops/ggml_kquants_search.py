"""ggml's K-quant scale searches (ggml-quants.c), vectorized over many sub-blocks at once.

The K-quant encoders (`kompakt.ops.ggml_kquants`) must write the same bytes as llama.cpp's
`quantize_row_q*_K_ref`, so every step here is the C code's float32 arithmetic in the C code's
order: products and sums are float32, sums over a sub-block are sequential (`_seqsum`:
numpy's `sum` is pairwise and would differ in the last bit), ties resolve like the C loops (the
first best wins) and `nearest_int` is ggml's own bit trick, out-of-range inputs included. The
vectorization runs across sub-blocks (rows of `x` [n_sub, n]); each C loop over one
sub-block's elements or search steps stays a loop (or a sequential accumulate) here.

llama.cpp's x86 build of libggml-base uses plain SSE scalar float math (no FMA contraction),
which is what makes this reproducible bit for bit.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even via the 1.5·2^23 trick (int32, same bits as C)."""
    with np.errstate(invalid="ignore", over="ignore"):
        f = np.asarray(v, dtype=F32) + F32(12582912.0)
    return (f.view(np.int32) & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum over `axis` in order, in float32, as a C `for` loop accumulates (numpy's pairwise
    `sum` would round differently).

    The search functions keep sub-blocks element-major ([n, n_sub]) so that this loop adds
    whole contiguous rows: ~15x faster than np.add.accumulate along a short last axis.
    """
    a = np.moveaxis(a, axis, 0)
    total = a[0].astype(F32, copy=True)
    for row in a[1:]:
        total += row
    return total


def seqmax(values: np.ndarray) -> np.ndarray:
    """C's `m = 0; for j: if (v[j] > m) m = v[j]` over the last axis (NaN never wins)."""
    best = np.zeros(values.shape[:-1], dtype=F32)
    for j in range(values.shape[-1]):
        best = np.where(values[..., j] > best, values[..., j], best)
    return best


def signed_absmax(values: np.ndarray) -> np.ndarray:
    """The first value of largest magnitude along the last axis (C's strict `>` scan from 0)."""
    amax = np.zeros(values.shape[:-1], dtype=F32)
    best = np.zeros(values.shape[:-1], dtype=F32)
    for j in range(values.shape[-1]):
        take = np.abs(values[..., j]) > amax
        amax = np.where(take, np.abs(values[..., j]), amax)
        best = np.where(take, values[..., j], best)
    return best


def _error(scale, lf, low, x, w, use_mad: bool) -> np.ndarray:
    diff = (scale * lf + low) - x
    diff = np.abs(diff) if use_mad else diff * diff
    return seqsum(w * diff)


def make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale + min search of q2_K / q4_K / q5_K: x, weights [n_sub, n] float32.

    Tries nstep + 1 scales around nmax / (max - min), each followed by a weighted
    least-squares fit of (scale, min), and keeps the lowest weighted error. As in ggml, `min`
    moves to each better solution, so later steps search around it. With explicit weights
    ggml's make_qkx3_quants (the imatrix paths) is the same computation, so this serves both.
    Returns (scale [n_sub], the_min [n_sub] (≥ 0, subtracted), L uint8 [n_sub, n]).
    """
    x, weights = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)  # [n, n_sub]
    low = low0 = np.minimum(x.min(axis=0), F32(0))
    high = x.max(axis=0)
    flat = high == low
    sum_w = seqsum(weights)
    sum_x = seqsum(weights * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (high - low)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (x - low)), 0, nmax)
        best_error = _error(scale, L.astype(F32), low, x, weights, use_mad)
        for step in range(nstep + 1 if nstep >= 1 else 0):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step)) + F32(nmax)) / (high - low)
            laux = np.clip(nearest_int(iscale * (x - low)), 0, nmax)
            lf = laux.astype(F32)
            wl = weights * lf
            sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur_error = _error(this_scale, lf, this_min, x, weights, use_mad)
            better = (det > 0) & (cur_error < best_error)
            L = np.where(better, laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat, 0, L)
    low = np.where(flat, low0, low)
    return scale.astype(F32), (-low).astype(F32), L.T.astype(np.uint8)


def _rounded(iscale: np.ndarray, x: np.ndarray, w: np.ndarray, wx: np.ndarray, nmax: int):
    """(l in [-nmax, nmax-1], Σ w·x·l, Σ w·l²) of the codes nearest to iscale·x; x, w, wx [n, n_sub]."""
    l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    lf = l.astype(F32)
    return l, seqsum(wx * lf), seqsum((w * lf) * lf)


def make_qx_quants(
    x: np.ndarray, nmax: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (rmse_type 1) of q6_K, and of q3_K with an imatrix: x [n_sub, n].

    RTN at -nmax/max and 18 nearby scales, each with the weighted least-squares scale (weights
    `qw` [n_sub, n], x² without); keeps the best. Returns (scale [n_sub] (may be negative),
    L uint8 [n_sub, n] = l + nmax).
    """
    peak = signed_absmax(x)
    dead = np.abs(peak) < GROUP_MAX_EPS
    x = np.ascontiguousarray(x.T)  # [n, n_sub]
    w = x * x if qw is None else np.ascontiguousarray(qw.T, dtype=F32)
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l, sumlx, suml2 = _rounded(F32(-nmax) / peak, x, w, wx, nmax)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = _rounded(-(F32(nmax) + F32(0.1) * F32(step)) / peak, x, w, wx, nmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    scale = np.where(dead, F32(0), scale)
    L = np.where(dead, 0, L)
    return scale.astype(F32), L.T.astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """q3_K's search (do_rmse): RTN at -nmax/max, then 5 rounds of per-weight coordinate
    descent on the weighted (w = x²) least-squares scale. x [n_sub, n] float32.

    Returns (scale [n_sub], L uint8 [n_sub, n] = l + nmax). A sub-block whose round changes
    nothing would change nothing in later rounds either, so all run the 5 rounds.
    """
    peak = signed_absmax(x)
    dead = np.abs(peak) < GROUP_MAX_EPS
    x = np.ascontiguousarray(x.T)  # [n, n_sub]
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, sumlx, suml2 = _rounded(F32(-nmax) / peak, x, w, wx, nmax)
        for _ in range(5):
            for i in range(len(x)):
                wi, wxi, li = w[i], wx[i], L[i].astype(F32)
                slx0 = sumlx - wxi * li
                sl2 = suml2 - (wi * li) * li
                new_l = np.clip(nearest_int((x[i] * sl2) / slx0), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx = slx0 + wxi * nf
                sl2 = sl2 + (wi * nf) * nf
                take = (slx0 > 0) & (new_l != L[i])
                take &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                L[i] = np.where(take, new_l, L[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    scale = np.where(dead, F32(0), scale)
    L = np.where(dead, 0, L + nmax)
    return scale.astype(F32), L.T.astype(np.uint8)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative sub-block scales (or mins) x [nb, n] to 0..nmax with weights qw
    (the imatrix paths of q2_K / q4_K / q5_K): the best of 9 scales by weighted squared
    error, then 5 rounds of coordinate descent. Returns (scale [nb], L uint8 [nb, n])."""
    peak = seqmax(x)
    dead = peak < GROUP_MAX_EPS
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(qw.T, dtype=F32)  # [n, nb]
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / peak
        L = nearest_int(iscale * x) & 0xFF  # stored in uint8 unclamped, as ggml does
        scale = F32(1) / iscale
        diff = x - scale * L.astype(F32)
        best_mse = seqsum((w * diff) * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / peak
            l = np.minimum(nmax, nearest_int(iscale_is * x))
            diff = x - (F32(1) / iscale_is) * l.astype(F32)
            mse = seqsum((w * diff) * diff)
            better = mse < best_mse
            best_mse = np.where(better, mse, best_mse)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, nearest_int(iscale * x))
        lf = l.astype(F32)
        L = l & 0xFF
        sumlx, suml2 = seqsum(wx * lf), seqsum((w * lf) * lf)
        for _ in range(5):
            for i in range(len(x)):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new_l = np.minimum(nmax, nearest_int((x[i] * sl2) / slx))
                nf = new_l.astype(F32)
                take = (slx > 0) & (sl2 > 0) & (new_l != L[i])
                slx = slx + wx[i] * nf
                sl2 = sl2 + (w[i] * nf) * nf
                take &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
                L[i] = np.where(take, new_l & 0xFF, L[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    scale = np.where(dead, F32(0), scale)
    L = np.where(dead, 0, L)
    return scale.astype(F32), L.T.astype(np.uint8)
