"""Statistics of one Linear's calibration inputs, gathered by a forward pre-hook.

What each calibration pass needs from a Linear's input X [samples, in]:
- SparseGPT / GPTQ: the Hessian H = 2/n · XᵀX (`collect` contains "hessian").
- Wanda / OWL: the column norms ‖X_j‖₂ (always collected: one reduction per batch).
- AWQ: the mean |X_j| per channel (always collected) and, for its scale search, the raw
  inputs themselves (`collect` contains "inputs"; memory n × len × in per Linear).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from kompakt.ops.hessian import HessianAccumulator

COLLECT_KINDS = ("hessian", "inputs", "norms")


def collect_kinds(collect: str | Iterable[str]) -> frozenset[str]:
    """Normalise `collect` ("hessian", "norms", "inputs", or several) to a set; ValueError if unknown."""
    kinds = frozenset([collect] if isinstance(collect, str) else collect)
    unknown = sorted(kinds - set(COLLECT_KINDS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {', '.join(COLLECT_KINDS)}")
    return kinds


@dataclass
class LinearStats:
    """Accumulated statistics of the inputs of one Linear (role e.g. "attn.q", "mlp.down").

    Attributes:
        role: the Linear's role in the arch table.
        module: the Linear itself (a process callback changes `module.weight` in place).
        n_samples: number of input rows (tokens) seen.
        sq_sum: Σ x_j² per input column [in] (fp32).
        abs_sum: Σ |x_j| per input column [in] (fp32).
        hessian_acc: the running Σ x xᵀ when the Hessian was requested.
        inputs: the raw inputs per batch [batch, len, in] when "inputs" was requested.
    """

    role: str
    module: nn.Linear
    n_samples: int = 0
    sq_sum: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    hessian_acc: HessianAccumulator | None = None
    inputs: list[torch.Tensor] | None = None
    _kinds: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def create(
        cls, role: str, module: nn.Linear, kinds: frozenset[str], hessian_dtype: torch.dtype = torch.float32
    ) -> LinearStats:
        device = module.weight.device
        acc = None
        if "hessian" in kinds:
            acc = HessianAccumulator(module.in_features, dtype=hessian_dtype, device=device)
        return cls(role=role, module=module, hessian_acc=acc, inputs=[] if "inputs" in kinds else None, _kinds=kinds)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch of inputs x [batch, len, in]; `mask` [batch, len] (True at real tokens)
        leaves padding positions out of every statistic but the raw inputs."""
        x = x.detach()
        rows = (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).float()  # [tokens, in]
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(rows.shape[1], device=rows.device)
            self.abs_sum = torch.zeros(rows.shape[1], device=rows.device)
        self.sq_sum += rows.square().sum(0)
        self.abs_sum += rows.abs().sum(0)
        self.n_samples += rows.shape[0]
        if self.hessian_acc is not None:
            self.hessian_acc.add_batch(rows)
        if self.inputs is not None:
            self.inputs.append(x)

    def alias(self, role: str, module: nn.Linear) -> LinearStats:
        """The statistics of another Linear that read the very same input tensor (k and v beside
        q, up beside gate): the accumulators are shared, not copied, so a change made to one
        (AWQ dividing the Gram by its scales) is seen by all of them once."""
        return replace(self, role=role, module=module)

    def _require(self) -> None:
        if self.n_samples == 0 or self.sq_sum is None:
            raise ValueError(f"no calibration inputs reached {self.role}")

    def hessian(self) -> torch.Tensor:
        """H = 2/n · Σ x xᵀ [in, in] (requires collect "hessian")."""
        if self.hessian_acc is None:
            raise ValueError("the Hessian was not collected; pass collect='hessian' to the driver")
        return self.hessian_acc.finalize()

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens [in] (Wanda's activation norm)."""
        self._require()
        return self.sq_sum.sqrt()  # type: ignore[union-attr]

    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| per input channel [in] (AWQ's activation scale)."""
        self._require()
        return self.abs_sum / self.n_samples  # type: ignore[operator]
