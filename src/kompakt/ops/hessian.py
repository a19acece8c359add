"""The layer Hessian H = 2/n · Σ x xᵀ of the reconstruction loss ‖WX − ŴX‖², built over batches.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") and SparseGPT (Frantar & Alistarh 2023) need H of every Linear
layer's inputs; Wanda (Sun et al. 2023) needs only ‖X_j‖₂, which is √(n/2 · H_jj).
Calibration activations arrive batch by batch, so H is accumulated as a running sum (fp32 by
default; fp64 for very long calibration sets or ill-conditioned layers) and divided at the end.
"""

from __future__ import annotations

import logging

import torch

from kompakt.errors import DataError

logger = logging.getLogger(__name__)


# Columns per block of the upper-triangle product: narrow enough that skipping the blocks below
# the diagonal saves most of the lower half, wide enough for full-speed matrix products.
SYRK_BLOCK = 256


class HessianAccumulator:
    """Accumulate Σ x xᵀ over batches of layer inputs; `finalize()` returns 2/n · Σ x xᵀ.

    Σ x xᵀ is symmetric, so each batch adds only the blocks on and above the diagonal (what
    BLAS's syrk does; torch has no syrk, and a separate BLAS's threads fight torch's): about a
    third less work for the widest inputs. The lower blocks are filled in from the upper ones
    when the sum is read (`sum_xxt`), in place.

    Args:
        in_features: width of the layer input.
        dtype: accumulation dtype (float32 or float64).
        device: where H lives (the inputs are moved there).
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self._sum: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._lower_stale = False  # the blocks below the diagonal lag behind the upper ones
        self.n_samples = 0

    @property
    def sum_xxt(self) -> torch.Tensor | None:
        """Σ x xᵀ [in, in], whole (None once taken)."""
        if self._sum is not None and self._lower_stale:
            _mirror_upper_blocks_(self._sum, SYRK_BLOCK)
            self._lower_stale = False
        return self._sum

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs `x` [..., in_features] (every leading position is one sample)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected inputs with {self.in_features} features, got {tuple(x.shape)}"
            )
        rows = x.reshape(-1, self.in_features)  # [n, in]: every position is a sample
        rows = rows.to(device=self._sum.device, dtype=self.dtype)
        for start in range(0, self.in_features, SYRK_BLOCK):
            block = rows[:, start : start + SYRK_BLOCK]
            self._sum[start : start + SYRK_BLOCK, start:].addmm_(block.T, rows[:, start:])
        self._lower_stale = True
        self.n_samples += rows.shape[0]

    def finalize(self) -> torch.Tensor:
        """H = 2/n · Σ x xᵀ [in, in] (a new tensor; more batches may still be added)."""
        if self.n_samples == 0:
            raise ValueError("no calibration inputs were added to the Hessian")
        return self.sum_xxt * (2.0 / self.n_samples)

    def take(self) -> torch.Tensor:
        """H, computed in place in the running sum, which the accumulator then gives up (no more
        batches, no second call): the caller holds the only [in, in] matrix instead of two (an
        11008-wide Hessian is 485 MB in fp32). The values are finalize()'s, bit for bit."""
        if self._sum is None:
            raise ValueError("the Hessian was already taken from this accumulator")
        if self.n_samples == 0:
            raise ValueError("no calibration inputs were added to the Hessian")
        hessian = self.sum_xxt.mul_(2.0 / self.n_samples)
        self._sum = None
        return hessian

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all samples [in] (Wanda's activation norm; the diagonal is always current)."""
        return self._sum.diagonal().clamp(min=0).sqrt()


def _mirror_upper_blocks_(matrix: torch.Tensor, block: int) -> None:
    """Copy the blocks above the diagonal of a square matrix onto those below it, transposed, in
    place, and within each diagonal block its upper triangle onto its lower one: a product XᵀX is
    not bitwise symmetric on every BLAS (AMD EPYC's differs in the last bit), and the sum must be,
    so that a symmetric permutation equals the gather and both triangles give one Cholesky."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        end = start + block
        diagonal = matrix[start:end, start:end]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        matrix[end:, start:end].copy_(matrix[start:end, end:].T)


def column_norms_from_hessian(hessian: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
    """‖X_j‖₂ from H's diagonal; without n_samples the result is proportional to it, which
    is all Wanda needs (a factor common to every column does not change any ranking)."""
    diag = hessian.diagonal().clamp(min=0)
    scale = 1.0 if n_samples is None else n_samples / 2.0
    return (diag * scale).sqrt()


def drop_dead_columns(
    weight: torch.Tensor, hessian: torch.Tensor, *, copy_hessian: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of (W, H) with dead inputs neutralised: where H_jj = 0 the input j was always 0,
    so W[:, j] cannot matter; set W[:, j] = 0 and H_jj = 1 to keep H invertible (the
    GPTQ / SparseGPT reference behaviour). `copy_hessian` False: H (fp32, the caller's to give
    up) is changed in place instead of copied."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone() if copy_hessian else hessian
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Inputs that were always 0 (H_jj = 0), as a bool mask [in]."""
    return hessian.diagonal() == 0


def permute_symmetric_(matrix: torch.Tensor, order: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`matrix[order][:, order]` of a symmetric square matrix, written into `matrix` itself with
    one block of rows as temporary memory (a gather would hold a second [in, in] copy). Columns
    are permuted row block by row block, the result transposed in place block by block (for a
    symmetric M, M[:, order]ᵀ = M[order, :]), then columns permuted again. Pure data movement:
    the values are the gather's exactly. Returns `matrix`."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        rows = matrix[start : start + block]
        rows.copy_(rows.index_select(1, order))
    transpose_(matrix, block)
    for start in range(0, n, block):
        rows = matrix[start : start + block]
        rows.copy_(rows.index_select(1, order))
    return matrix


def transpose_(matrix: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Transpose a square matrix in place (blocks (i, j) and (j, i) swapped, one block of
    temporary memory). Returns `matrix`."""
    n = matrix.shape[0]
    for i in range(0, n, block):
        diagonal = matrix[i : i + block, i : i + block]
        diagonal.copy_(diagonal.T.clone())
        for j in range(i + block, n, block):
            upper, lower = matrix[i : i + block, j : j + block], matrix[j : j + block, i : i + block]
            saved = upper.clone()
            upper.copy_(lower.T)
            lower.copy_(saved.T)
    return matrix


def inverse_cholesky_upper(
    hessian: torch.Tensor, percdamp: float = 0.01, *, max_tries: int = 6, consume: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹), λ = percdamp · mean(diag H).

    GPTQ and SparseGPT read the rows of U: U[i, i] is the pivot and U[i, i:] the update
    direction for the remaining columns. If a factorisation fails (H not positive definite in
    floating point), λ is multiplied by 10 and it is retried, with a warning.

    `consume`: the caller hands `hessian` over (nobody reads it afterwards). With damping > 0 the
    three factorisations then run in its own memory (no second [in, in] matrix at all, as the
    reference code factorises H in place; the same bits as the copying path), and a failure
    cannot be retried: DataError (not seen with damping > 0: H + λI is positive definite with
    room to spare). Without damping, H is kept for the retries until its first factor exists,
    then freed (two matrices at a time, not three).

    Returns (U, the relative damping actually used).
    """
    mean_diag = hessian.diagonal().mean().item()
    damp = percdamp
    if consume and damp > 0 and hessian.device.type == "cpu":  # LAPACK's in-place factorisation (RAM is short)
        return _inverse_cholesky_in_place(hessian, damp * mean_diag, damp), damp
    diagonal = hessian.diagonal().clone() if consume else None
    # Memory: each [in, in] temporary is freed as soon as the next exists (an 11008-wide
    # Hessian is 485 MB in fp32); no identity matrix, the damping is added to the diagonal.
    for _ in range(max_tries):
        if diagonal is not None:
            damped = hessian
            damped.diagonal().copy_(diagonal).add_(damp * mean_diag)
        else:
            damped = hessian.clone()
            damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            if diagonal is not None:  # handed over: free it now, whoever still refers to it
                hessian.untyped_storage().resize_(0)
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and _all_finite(upper):
                return upper, damp
            if diagonal is not None:
                break
        next_damp = damp * 10 if damp > 0 else 1e-4
        logger.warning("Cholesky failed with damping %.3g; retrying with %.3g", damp, next_damp)
        damp = next_damp
    raise DataError(
        f"the layer Hessian is not positive definite even with damping {damp:g};"
        " use more (or more varied) calibration data or a larger percdamp"
    )


def _all_finite(matrix: torch.Tensor, rows: int = 1024) -> bool:
    """torch.isfinite(matrix).all(), a block of rows at a time: on the whole of an 11008-wide
    matrix its temporaries peak at 0.75 of the matrix's own size."""
    return all(bool(torch.isfinite(matrix[start : start + rows]).all()) for start in range(0, matrix.shape[0], rows))


def _inverse_cholesky_in_place(hessian: torch.Tensor, damping: float, damp: float) -> torch.Tensor:
    """inverse_cholesky_upper's chain in `hessian`'s own memory: LAPACK factorises a column-major
    matrix in place, and for a symmetric H the row-major tensor's transpose view is one (torch
    copies a row-major input first: a second [in, in] matrix, 485 MB for an 11008-wide H)."""
    hessian.diagonal().add_(damping)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    column_major = hessian.mT
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    if info.item() == 0:
        torch.cholesky_inverse(column_major, out=column_major)
        torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
    if info.item() != 0 or not _all_finite(hessian):
        raise DataError(f"the layer Hessian is not positive definite with damping {damp:g}; use more (or more "
                        "varied) calibration data or a larger percdamp")  # fmt: skip
    return transpose_(hessian)  # the view holds U: the tensor Uᵀ; U row-major, as the copying path returns it
