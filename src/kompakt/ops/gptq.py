"""GPTQ: quantize a Linear layer column by column, correcting the rest of the row for each error.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323). Minimises ‖WX − ŴX‖² for one layer
given H = 2/n · XᵀX (`kompakt.ops.hessian`): each column is rounded to the grid and its
error is spread over the not-yet-quantized columns through the upper Cholesky factor of H⁻¹
(OBS update), with lazy batch updates in blocks of 128 columns. Use it instead of RTN at 4
bits and below; at 8 bits RTN is already close to lossless.

Works with any `kompakt.ops.quant.Grid`: `QuantGrid` (int grids, per channel or in groups),
`GGUFBlockGrid` (llama.cpp q4_0 / q4_1 / q8_0, groups = 32-column blocks) and `KQuantGrid`
(llama.cpp K-quants, groups = 256-column super-blocks whose sub-blocks each have their own
scale: each column is coded with `column_params`).

Design decisions:
- Groups are always contiguous input columns in the original order ("static groups"), also
  with `act_order`; the result needs no g_idx and is storable by compressed-tensors and GGUF.
- A group's scale / zero are fitted when the column loop first reaches any of its columns,
  from the group's weights as updated at that moment (pending lazy-batch updates included,
  so the fit sees exactly the weights it will quantize). Without act_order this is the
  reference behaviour (fit at the group's first column); with act_order it is the natural
  extension: the params adapt to every update made before the group is touched.
- Dead inputs (H_jj = 0) get W[:, j] = 0; a failed Cholesky retries with 10× damping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kompakt.ops.hessian import HessianAccumulator, dead_inputs, inverse_cholesky_upper, permute_symmetric_
from kompakt.ops.quant import Grid, GroupParams, column_params


@dataclass
class GPTQResult:
    """What GPTQ produced for one layer (all in the original column order).

    weight: float32 [out, in], exactly grid.decode(codes) (dequantized; cast it yourself).
    codes: int32 [out, in], the integers a packer stores (int8 for a grid whose codes fit it:
        QuantGrid at up to 8 bits signed, 7 unsigned).
    scales: float32 [out, n_groups]; zeros: [out, n_groups] or None (meaning as in the grid);
        [out, n_groups, n_sub] each for grids with per-column params (K-quant sub-blocks).
    loss: Σ (w − ŵ)² / (2 · [H⁻¹]_jj), GPTQ's estimate of the output-error increase.
    perm: the column order used with act_order, else None.
    damp: the relative damping used (percdamp, or more after a failed Cholesky).
    stored: [out, n_groups, k], the groups' GroupParams.stored (the exact header bytes a
        K-quant packer needs, `KQuantGrid.pack`), or None for grids without it.
    row_loss: [out], the loss of each output row (rows are independent in GPTQ, so the rows of
        several weights sharing one Hessian and grid can be solved as one stacked weight).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    loss: float
    perm: torch.Tensor | None
    damp: float
    stored: torch.Tensor | None = None
    row_loss: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> GPTQResult:
        """The result of output rows [start, end) alone (one weight of a stacked solve)."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:end]

        row_loss = cut(self.row_loss)
        return replace(self, weight=self.weight[start:end], codes=self.codes[start:end], scales=self.scales[start:end],
                       zeros=cut(self.zeros), stored=cut(self.stored), row_loss=row_loss,
                       loss=float(row_loss.sum()) if row_loss is not None else self.loss)  # fmt: skip


def gptq_quantize(
    weight: torch.Tensor | Sequence[torch.Tensor],
    hessian: torch.Tensor | HessianAccumulator,
    grid: Grid,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """Quantize `weight` [out, in] onto `grid` with GPTQ, given the input Hessian [in, in].

    `weight`: one tensor, or several sharing the Hessian, solved as their rows stacked (read,
    never changed). `hessian`: the matrix (copied), or its HessianAccumulator, whose running sum
    is then taken over and used in place (HessianAccumulator.take): a 7B MLP's 11008-wide
    Hessian is 485 MB, and this way no more than two [in, in] matrices exist at a time."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    in_features = weights[0].shape[1]
    shape = torch.Size([sum(w.shape[0] for w in weights), in_features])
    h = hessian.take() if isinstance(hessian, HessianAccumulator) else None
    if h is None:
        if hessian.shape != (in_features, in_features):  # type: ignore[union-attr]
            raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(shape)}")  # type: ignore[union-attr]
        h = hessian.detach().float().clone()  # type: ignore[union-attr]
    elif h.shape != (in_features, in_features):
        raise ValueError(f"Hessian {tuple(h.shape)} does not match weight {tuple(shape)}")
    elif h.dtype != torch.float32:  # accumulated in fp64: solved in fp32, as a given matrix is
        h = h.float()
    group = grid.group_size_for(in_features)
    dead = dead_inputs(h)
    if act_order:  # most important inputs (largest H_jj) first
        order = torch.argsort(h.diagonal(), descending=True)
        permute_symmetric_(h, order)  # position p holds original column order[p]
    else:
        order = torch.arange(in_features, device=h.device)
    dead = dead[order]
    h[dead, dead] = 1.0  # dead inputs (always 0): W[:, j] = 0, H_jj = 1 keeps H invertible (the reference's rule)
    hinv, damp = inverse_cholesky_upper(h, percdamp, consume=True)
    del h  # [in, in]: freed before the column loop
    w = _permuted_rows(weights, order, shape)  # after the factorisation: not alive at its peak
    w[:, dead] = 0.0
    state = _State(w, hinv, grid, group, order)
    del w, hinv  # the state owns them (and frees them before building the result)
    for start in range(0, in_features, block_size):
        state.run_block(start, min(start + block_size, in_features))
    return state.result(shape, damp, order if act_order else None)


def _permuted_rows(weights: list[torch.Tensor], order: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The stacked rows of `weights` in fp32 with columns in processing order: one new [out, in]
    tensor, each weight's columns gathered straight into its rows (no stacked copy first)."""
    w = torch.empty(shape, dtype=torch.float32, device=weights[0].device)
    start = 0
    for weight in weights:
        rows = w[start : start + weight.shape[0]]
        torch.index_select(weight.detach().float(), 1, order, out=rows)
        start += weight.shape[0]
    return w


class _State:
    """The column loop's working set; positions are in permuted (processing) order."""

    def __init__(
        self, w: torch.Tensor, hinv: torch.Tensor, grid: Grid, group: int, order: torch.Tensor
    ) -> None:
        out_features, in_features = w.shape
        self.w, self.hinv, self.grid, self.group = w, hinv, grid, group
        self.position = torch.empty_like(order)
        # position[c] = where original column c sits in the processing order
        self.position[order] = torch.arange(in_features, device=w.device)
        # int8 when the grid's codes fit it (a quarter of int32: 0.35 GB less for a 7B gate/up pair).
        small = -128 <= getattr(grid, "q_min", -129) and getattr(grid, "q_max", 128) <= 127
        self.codes = torch.zeros(out_features, in_features, dtype=torch.int8 if small else torch.int32, device=w.device)
        # The dequantized columns are written into w's own columns once their block is done: a
        # finished position is never read again (a group is fitted when its first column is
        # reached, from later positions only), so the result needs no third [out, in] tensor.
        self.losses = torch.zeros(out_features, device=w.device)
        self.params: dict[int, GroupParams] = {}
        self.group_at = (order // group).tolist()  # group id of each position (one host sync)
        self.column_at = (order % group).tolist()  # column within its group

    def run_block(self, i1: int, i2: int) -> None:
        """Quantize positions [i1, i2); then apply the block's errors to all later columns.

        The per-column results are collected in lists and written once per block: on CPU the
        loop's cost is the number of tensor ops per column, not their arithmetic."""
        w1 = self.w[:, i1:i2].clone()
        hinv1 = self.hinv[i1:i2, i1:i2]
        codes, deqs, errs = [], [], []  # one [out, 1] column each
        for i in range(i2 - i1):
            gid = self.group_at[i1 + i]
            if gid not in self.params:
                done = torch.cat(errs, dim=1) if errs else w1[:, :0]
                self.params[gid] = self._fit_group(gid, i1, done)
            col = w1[:, i : i + 1]  # [out, 1]
            params = column_params(self.grid, self.params[gid], self.column_at[i1 + i])
            q = self.grid.encode(col, params)
            deq = self.grid.decode(q, params)
            err = (col - deq) / hinv1[i, i]  # [out, 1]
            w1[:, i:] -= err * hinv1[i : i + 1, i:]
            codes.append(q)
            deqs.append(deq)
            errs.append(err)
        err1 = torch.cat(errs, dim=1)  # [out, i2 - i1]
        self.codes[:, i1:i2] = torch.cat(codes, dim=1)
        self.losses += err1.square().sum(1) / 2
        rest = self.w[:, i2:]  # w -= err1 @ hinv in place: BLAS updates C itself (same bits; no [out, in] temporary)
        torch.addmm(rest, err1, self.hinv[i1:i2, i2:], alpha=-1, out=rest)
        self.w[:, i1:i2] = torch.cat(deqs, dim=1)  # after the update, which reads only columns >= i2

    def _fit_group(self, gid: int, i1: int, err_done: torch.Tensor) -> GroupParams:
        """Fit group `gid` on its current weights: the block-start values minus the updates
        of the block's already-quantized columns (err_done [out, k]) — exact, not stale."""
        in_features = self.w.shape[1]
        cols = self.position[gid * self.group : min((gid + 1) * self.group, in_features)]
        k = err_done.shape[1]
        current = self.w[:, cols] - err_done @ self.hinv[i1 : i1 + k][:, cols]  # [out, group]
        return self.grid.fit(current)

    def result(self, shape: torch.Size, damp: float, perm: torch.Tensor | None) -> GPTQResult:
        self.hinv = None  # type: ignore[assignment]  # not needed any more
        deq, codes = self.w, self.codes
        if perm is not None:  # back to the original column order, in place
            _permute_columns_(deq, self.position)
            _permute_columns_(codes, self.position)
        self.codes = None  # type: ignore[assignment]
        n_groups = -(-shape[1] // self.group)
        params = [self.params[g] for g in range(n_groups)]
        zeros = None if params[0].zero is None else torch.stack([p.zero for p in params], dim=1)
        stored = None if params[0].stored is None else torch.stack([p.stored for p in params], 1)
        return GPTQResult(
            weight=deq,
            codes=codes,
            scales=torch.stack([p.scale for p in params], dim=1),
            zeros=zeros,
            group_size=self.group,
            loss=float(self.losses.sum()),
            perm=perm,
            damp=damp,
            stored=stored,
            row_loss=self.losses,
        )


def _permute_columns_(matrix: torch.Tensor, index: torch.Tensor, rows: int = 1024) -> None:
    """matrix[:, index] written into `matrix` itself, a block of rows at a time (temporary memory:
    one block, not a second [out, in] tensor)."""
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows]
        block.copy_(block.index_select(1, index))
