"""A synthetic Linear layer with correlated inputs and a few outlier channels (CPU, seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kompakt.ops.hessian import HessianAccumulator

OUTLIER_CHANNELS = (5, 37, 70, 101)


@dataclass
class Layer:
    weight: torch.Tensor  # [out, in]
    inputs: torch.Tensor  # [n, in]
    hessian: torch.Tensor  # [in, in]
    column_norms: torch.Tensor  # [in]

    def output_error(self, approx: torch.Tensor) -> float:
        """‖W Xᵀ − Ŵ Xᵀ‖_F on the calibration inputs."""
        return float(((self.weight - approx.float()) @ self.inputs.T).norm())


def make_layer(
    out_features: int = 64, in_features: int = 128, n: int = 1024, seed: int = 0
) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features**0.5
    # correlated inputs: H is far from diagonal, so GPTQ / SparseGPT updates matter
    inputs = torch.randn(n, in_features, generator=gen) @ mixing
    inputs[:, [c for c in OUTLIER_CHANNELS if c < in_features]] *= 10.0
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    acc = HessianAccumulator(in_features)
    acc.add_batch(inputs)
    return Layer(weight, inputs, acc.finalize(), acc.column_norms())


@pytest.fixture(scope="session")
def layer() -> Layer:
    return make_layer()


@pytest.fixture(scope="session")
def layer_factory():
    """make_layer(out_features, in_features, n, seed) for tests that need another shape."""
    return make_layer
