"""Round-to-nearest quantization on integer grids (per channel or in groups along the input dim).

`fake_quantize` returns the dequantized weight (same shape and dtype), which is what analysis
and evaluation need; packing into storage formats lives elsewhere.

`QuantGrid` is the explicit, storable form (codes, scales, zero points) shared by RTN and GPTQ
(`kompakt.ops.gptq`); symmetric it equals `fake_quantize` bit for bit, asymmetric it widens the
range to contain 0 (so the zero point is a storable integer), which `fake_quantize` does not; `Grid` is the protocol GPTQ codes against, which the llama.cpp block
formats in `kompakt.ops.gguf_grid` implement too. Round-to-nearest is the baseline every
post-training method is compared with (e.g. Dettmers et al. 2022, "LLM.int8()"; Frantar et al.
2022, "GPTQ"): use it when speed matters or as the starting grid for a smarter method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View [out, in] as [out, n_groups, group] (group = in when per-channel)."""
    out_features, in_features = weight.shape
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return weight.reshape(out_features, 1, in_features)
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {in_features}")
    return weight.reshape(out_features, in_features // group_size, group_size)


def fake_quantize(
    weight: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True
) -> torch.Tensor:
    """Quantize `weight` [out, in] to `bits` by round-to-nearest and return it dequantized.

    Symmetric: integers in [-(2^(bits-1)), 2^(bits-1) - 1] and scale = (the signed value of
    largest magnitude) / -(2^(bits-1)), llama.cpp's q4_0 rule: the extreme weight lands exactly on
    the lowest code, so all 2^bits levels are used and the scale may be negative. On SmolLM2
    4-bit g64 this gives 10 % lower perplexity than max|w| / (2^(bits-1) - 1) and 8 % lower than
    compressed-tensors' max|w| / (2^(bits-1) - 0.5). Asymmetric: scale and zero point from min
    and max, integers in [0, 2^bits - 1].
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    groups = _grouped(weight.float(), group_size)
    if symmetric:
        q_min = -(2 ** (bits - 1))
        scale = _nonzero(signed_absmax(groups) / q_min)
        q = torch.clamp(torch.round(groups / scale), q_min, -q_min - 1)
        dequant = q * scale
    else:
        q_max = 2**bits - 1
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / q_max
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(groups / scale) + zero, 0, q_max)
        dequant = (q - zero) * scale
    return dequant.reshape(weight.shape).to(weight.dtype)


def signed_absmax(w: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim (first one on ties), sign kept; [..., 1]."""
    return torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has scale 0; any nonzero scale encodes it exactly (and avoids 0/0).
    return torch.where(scale != 0, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------------------------
# Explicit integer grids (RTN and GPTQ share them; a packer stores q, scale, zero exactly).
# --------------------------------------------------------------------------------------------


class GroupParams(NamedTuple):
    """Quantization parameters of one group of columns, one value per output row.

    `scale` [out]; `zero` [out] or None. The meaning of `zero` belongs to the grid that made
    it (an integer zero point for `QuantGrid`, the fp16 block minimum for GGUF q4_1). A grid
    whose scale varies inside a group (llama.cpp K-quant sub-blocks) gives [out, n_sub] and
    `column_params`. `stored` [out, k]: the grid's exact storage form of these parameters when
    scale / zero do not determine it (a K-quant super-block header), else None.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None
    stored: torch.Tensor | None = None


class Grid(Protocol):
    """What GPTQ needs from a quantization grid: groups of contiguous input columns.

    A group's parameters are fitted once (`fit`) from the weights of all its columns, then each
    column is encoded to integers (`encode`) and decoded (`decode`) with those parameters.
    """

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for this input size (in_features = one group per row)."""
        ...

    def fit(self, w: torch.Tensor) -> GroupParams:
        """Parameters for one group; `w` [out, k] holds the group's k columns."""
        ...

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Integer codes (int32) of `w` [out, k] on the grid fixed by `params`."""
        ...

    def decode(self, q: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Float32 values of codes `q` [out, k]."""
        ...

    # Optional: column_params(params, j) -> GroupParams, the parameters encode / decode use
    # for the group's column j (0-based), for grids whose scale changes inside a group
    # (kompakt.ops.ggml_kquant_grid). Without it, a group's parameters hold for every column.


def column_params(grid: Grid, params: GroupParams, j: int) -> GroupParams:
    """The parameters of column `j` of a group: `grid.column_params` where the grid has it."""
    of_column = getattr(grid, "column_params", None)
    return params if of_column is None else of_column(params, j)


def group_bounds(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each group along the input dim; the last one may be shorter."""
    return [(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


@dataclass(frozen=True)
class QuantGrid:
    """A uniform integer grid: `bits`, groups of `group_size` input columns, (a)symmetric.

    Symmetric: q in [-2^(b-1), 2^(b-1) - 1], w ≈ q·scale, scale = signed extreme / -2^(b-1)
    (may be negative; see `fake_quantize`), no zero point (`zero` is None). Asymmetric: q in
    [0, 2^b - 1], w ≈ (q - zero)·scale with an integer zero; the range is widened to contain 0
    (as compressed-tensors and the GPTQ reference do) so the zero point is always a storable
    integer in [0, 2^b - 1].

    group_size None (or <= 0, or >= in_features): one group per output row (per channel).
    A group size that does not divide in_features raises unless `allow_partial_group` is set;
    then the last group is shorter. compressed-tensors (strategy "group") and llama.cpp block
    formats cannot store a shorter last group, so exporters must reject such grids.

    `scale_dtype`: scales are rounded to this dtype when fitted (e.g. torch.float16 or
    torch.bfloat16 when the exporter stores them so), so the grid GPTQ optimises against is
    exactly the one that gets stored. Default float32.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    allow_partial_group: bool = False
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        g = self.group_size
        if g is None or g <= 0 or g >= in_features:
            return in_features
        if in_features % g and not self.allow_partial_group:
            raise ValueError(
                f"group size {g} does not divide the input dimension {in_features};"
                " choose a divisor (e.g. 32 or 64) or set allow_partial_group=True"
                " (a shorter last group, which compressed-tensors and GGUF cannot store)"
            )
        return g

    def n_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size_for(in_features))

    def fit(self, w: torch.Tensor) -> GroupParams:
        w = w.float()
        if self.symmetric:
            scale = signed_absmax(w).squeeze(-1) / self.q_min
            return GroupParams(self._store(scale), None)
        # Widen to include 0 so that zero = round(-low / scale) lies in [0, q_max].
        low = w.amin(dim=-1).clamp(max=0)
        high = w.amax(dim=-1).clamp(min=0)
        scale = self._store((high - low) / self.q_max)
        zero = torch.round(-low / scale).clamp(0, self.q_max)
        return GroupParams(scale, zero)

    def _store(self, scale: torch.Tensor) -> torch.Tensor:
        # Round to the stored dtype first (it may underflow to 0).
        return _nonzero(scale.to(self.scale_dtype).float())

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        scale = params.scale.unsqueeze(-1)  # [out, 1] broadcast over the group's columns
        q = torch.round(w.float() / scale)
        if params.zero is not None:
            q = q + params.zero.unsqueeze(-1)
        return q.clamp(self.q_min, self.q_max).to(torch.int32)

    def decode(self, q: torch.Tensor, params: GroupParams) -> torch.Tensor:
        q = q.float()
        if params.zero is not None:
            q = q - params.zero.unsqueeze(-1)
        return q * params.scale.unsqueeze(-1)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RTN: `w` [out, in] -> (q int32 [out, in], scale [out, G], zero [out, G] or None)."""
        g = self.group_size_for(w.shape[1])
        qs, scales, zeros = [], [], []
        for start, end in group_bounds(w.shape[1], g):
            params = self.fit(w[:, start:end])
            qs.append(self.encode(w[:, start:end], params))
            scales.append(params.scale)
            zeros.append(params.zero)
        zero = None if self.symmetric else torch.stack(zeros, dim=1)
        return torch.cat(qs, dim=1), torch.stack(scales, dim=1), zero

    def dequantize(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        """Inverse of `quantize`: float32 [out, in] from codes and per-group parameters."""
        g = self.group_size_for(q.shape[1])
        cols = [
            self.decode(q[:, s:e], GroupParams(scale[:, i], None if zero is None else zero[:, i]))
            for i, (s, e) in enumerate(group_bounds(q.shape[1], g))
        ]
        return torch.cat(cols, dim=1)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """RTN on this grid, dequantized, in `w`'s dtype."""
        return self.dequantize(*self.quantize(w)).to(w.dtype)
