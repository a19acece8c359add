"""Per-tensor quantization sensitivity: the predicted KL increase of storing one weight tensor
in each GGUF type, for every tensor at once (what the mixed-precision allocation chooses from).

The proxy (HAWQ-v2's second-order view, with the Fisher in place of the Hessian, as in
"Optimal Brain Compression" and llama.cpp's imatrix, which keeps the activation half of it):
near the trained weights, KL(p_W || p_W+δ) ≈ ½ δᵀ F δ, F the Fisher information of the model's
own next-token distribution. Keeping F's diagonal, storing tensor T in type t costs

    KL_T(t) ≈ ½ Σ_w F_ww (W − Q_t(W))²_w ,        additive over tensors,

where Q_t is llama.cpp's reference quantizer for t (kompakt.ops.ggml_types.fake_quantize: plain
rounding; GPTQ / AWQ keep a share of it, kompakt.auto.predict). The off-diagonal terms drop out
in expectation because rounding errors of different weights are nearly independent and zero-mean.

F's diagonal is estimated with labels sampled from the model itself (the true Fisher, not the
"empirical" one on the text's own next tokens, which overweights tokens the model gets wrong):
per calibration block, one forward, one label per position drawn from the model's softmax,
one backward of the summed log-likelihood, and the squared gradient of each weight. With the
input fixed, the positions' score vectors are independent and zero-mean, so the square of their
sum is an unbiased estimate of the sum of their squares; divided by the positions it is the
per-token Fisher (KL is averaged per token). A tied embedding / output matrix is one parameter
and one tensor: its gradient holds both uses (cross term included).

The rounding error is measured on a sample of each tensor's rows (`sampled_rows`): rows are
quantized independently, so ½ Σ F (W − Q_t(W))² is a sum over rows, estimated without bias by
drawing rows with probability ∝ Σ F W² (the cost's shape: rounding error grows with the row's
scale) and weighting each drawn row by 1 / (draws · probability). Where the Fisher mass sits in
a few rows (an embedding: the frequent tokens), the draws land on those few. Measured on
SmolLM2 against every row: within 1 % on the embedding (346 distinct rows of 49152), mostly
within 5 % on the layers, the types of one tensor always compared on the same rows.

Cost: a forward and a backward per block (≈ 3 forwards) and the reference quantization of the
sampled rows in every candidate type (numpy, ≈ 0.03 s per million weights and type on one core).
Memory: the gradients and F (2 x the fp32 weights) and one block's logits at a time (Gemma 3's
262k vocabulary: 256 positions x 262144 x 4 B = 268 MB, times a few for softmax and its
gradient). Measured against one-tensor-at-a-time KL on SmolLM2 in
tests/scoring/test_tensor_sensitivity.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from kompakt.ops.ggml_types import FLOAT_TYPES, QUANT_TYPES, fake_quantize, ggml_type

logger = logging.getLogger(__name__)

ROW_CHUNK = 8192  # rows quantized at a time (bounds the numpy temporaries of a 262k-row embedding)
# Rows drawn per tensor: this many, or 1/16 of the rows where that is more; a tensor with fewer
# rows is measured whole.
SAMPLE_ROWS, SAMPLE_SHARE = 256, 1 / 16
# Seconds per weight and candidate type of the reference quantizers (gguf-py numpy, one core;
# measured on 2.6 M weights: q4_0 0.035 s, q5_0 0.067 s, q5_1 / q8_0 0.1 s -> ~3e-8 on average).
QUANTIZE_S_PER_WEIGHT = 3e-8
FORWARDS_PER_BLOCK = 3.0  # forward + backward with weight gradients


@dataclass
class TensorCost:
    """One weight tensor: its name in the model (the recipe key), shape and the predicted KL
    increase (plain rounding) of each type its rows fit."""

    name: str  # module name, e.g. model.layers.0.mlp.down_proj (tied embedding: model.embed_tokens)
    shape: tuple[int, int]  # [out, in], rows of `in` weights (what GGUF blocks run along)
    kl: dict[str, float]  # GGUF type -> predicted KL increase

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "kl": dict(self.kl)}


@dataclass
class TensorSensitivity:
    """Every tensor's predicted KL per type, and how it was measured."""

    tensors: list[TensorCost]
    tokens: int  # positions the Fisher was averaged over
    blocks: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["tensors"] = [t.to_dict() for t in self.tensors]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TensorSensitivity:
        tensors = [TensorCost(t["name"], tuple(t["shape"]), dict(t["kl"])) for t in values["tensors"]]
        return cls(tensors, values["tokens"], values["blocks"], values["seconds"], list(values.get("notes", [])))

    def predicted_kl(self, types: dict[str, str]) -> float:
        """Sum of the tensors' predicted KL for a name -> type map (tensors not named: f16)."""
        return sum(t.kl[types.get(t.name, "f16")] for t in self.tensors)


def available_types(types: tuple[str, ...] = QUANT_TYPES) -> tuple[str, ...]:
    """The GGUF types whose reference quantizer kompakt has (the K-quants and iq4_nl need their
    own encoders, kompakt.ops.ggml_kquants / ggml_iq4nl; types without one cannot be measured)."""
    found = []
    for name in types:
        block = ggml_type(name).block
        try:
            fake_quantize(np.zeros((1, block), dtype=np.float32), name)
        except KeyError:
            continue
        found.append(name)
    return tuple(found)


def weight_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Module name -> 2-D weight of every matrix of the model, a tied matrix once (under the
    embedding's name: named_parameters keeps the first owner)."""
    return {
        name.removesuffix(".weight"): param
        for name, param in model.named_parameters()
        if name.endswith(".weight") and param.dim() == 2
    }


def fisher_diagonal(model: nn.Module, blocks: torch.Tensor, params: dict[str, nn.Parameter], *,
                    prefix: list[int] | tuple[int, ...] = (), seed: int = 0,
                    advance: Callable[[], None] = lambda: None) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
    """Per-token Fisher diagonal of each parameter in `params` over `blocks` [n, len] (labels
    sampled from the model); returns ({name: F like the weight}, positions averaged over).

    `prefix` (what the tokenizer puts before text: Gemma's <bos>) goes in front of each block,
    as evaluation scores windows; only the block's own positions are sampled."""
    generator = torch.Generator().manual_seed(seed)
    wanted = {id(p) for p in params.values()}
    was = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    positions = 0
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        for block in blocks:
            ids = torch.cat([torch.tensor(list(prefix), dtype=block.dtype), block.reshape(-1)]).reshape(1, -1)
            ids = ids.to(next(model.parameters()).device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prefix) :].float()  # [len, vocab]
            log_probs = torch.log_softmax(logits, dim=-1)
            labels = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(logits.device)
            log_probs.gather(-1, labels).sum().backward()
            del logits, log_probs
            for name, p in params.items():
                fisher[name].add_(p.grad.float().square())
                p.grad = None
            positions += block.numel()
            advance()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(was[name])
            p.grad = None
    for value in fisher.values():
        value.div_(max(1, positions))
    return fisher, positions


def draws(rows: int) -> int:
    """Rows drawn from a tensor of `rows` rows (all of them when it has few)."""
    return min(rows, max(SAMPLE_ROWS, int(rows * SAMPLE_SHARE)))


def sampled_rows(w: np.ndarray, f: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, weights) whose weighted sum of per-row costs estimates the sum over all rows.

    Systematic sampling with probability ∝ Σ_j F_ij W_ij² (with replacement: a row drawn k times
    is quantized once and weighted k times); a tensor of at most `draws` rows is taken whole."""
    rows = w.shape[0]
    n = draws(rows)
    proxy = np.einsum("ij,ij->i", f.astype(np.float64), np.square(w, dtype=np.float64))
    if n == rows or not proxy.sum() > 0:
        return np.arange(rows), np.ones(rows)
    p = proxy / proxy.sum()
    positions = (np.random.default_rng(seed).random() + np.arange(n)) / n
    drawn = np.minimum(np.searchsorted(np.cumsum(p), positions, side="right"), rows - 1)
    index, counts = np.unique(drawn, return_counts=True)
    return index, counts / (n * p[index])


def type_costs(weight: torch.Tensor, fisher: torch.Tensor, types: tuple[str, ...], seed: int = 0) -> dict[str, float]:
    """½ Σ F (W − Q_t(W))² for each type in `types` whose rows fit (f16 always), on sampled rows."""
    w = weight.detach().to("cpu", torch.float32).numpy()
    f = fisher.to("cpu", torch.float32).numpy()
    index, row_weights = sampled_rows(w, f, seed)
    w, f = w[index], f[index] * row_weights[:, None].astype(np.float32)
    cols = w.shape[1]
    fitting = [t for t in types if t in FLOAT_TYPES or ggml_type(t).fits(cols)]
    costs = dict.fromkeys(["f16", *fitting], 0.0)
    for start in range(0, w.shape[0], ROW_CHUNK):
        chunk, weights = w[start : start + ROW_CHUNK], f[start : start + ROW_CHUNK]
        for name in costs:
            if name == "f32":
                continue
            error = np.square(fake_quantize(chunk, name) - chunk, dtype=np.float64).ravel()
            costs[name] += 0.5 * float(np.dot(weights.ravel().astype(np.float64), error))
    return _off_grid(costs)


# A weight that already lies on a type's grid (a model dequantized from a GGUF: the embedded
# SmolLM2 is Q4_1, the embedded Gemma 3 Q4_K_M) rounds to itself: zero error. That zero does not
# survive the passes — AWQ rescales channels, GPTQ refits every block on updated weights — so
# such a cost is replaced by what the bits predict: the tensor's 4-bit 32-block error times
# 4^(4.5 − bits per weight) (rounding error power falls 4x per bit). Measured before this rule on
# SmolLM2's default run: 42 tensors at q4_1 were predicted free and the layers' KL came out
# 2.2x the prediction (0.135 vs 0.061).
ON_GRID = 0.05  # a cost below this share of what its bits predict means "already on the grid"
_FOUR_BIT = ("q4_0", "iq4_nl", "q4_1")


def _off_grid(costs: dict[str, float]) -> dict[str, float]:
    reference = max((costs[t] for t in _FOUR_BIT if t in costs), default=0.0)
    for name in costs:
        if name in FLOAT_TYPES or reference == 0.0:
            continue
        expected = reference * 4.0 ** (4.5 - ggml_type(name).bits_per_weight)
        if costs[name] < ON_GRID * expected:
            costs[name] = expected
    return costs


def tensor_sensitivity(model: nn.Module, blocks: torch.Tensor, *, names: list[str] | None = None,
                       types: tuple[str, ...] | None = None, prefix: list[int] | tuple[int, ...] = (), seed: int = 0,
                       advance: Callable[[], None] = lambda: None) -> TensorSensitivity:  # fmt: skip
    """Predicted KL of each tensor (`names`, default every 2-D weight) at each type (default:
    every GGUF quantized type kompakt can quantize) from the Fisher on calibration `blocks`
    (each behind `prefix`, see fisher_diagonal)."""
    started = time.perf_counter()
    weights = weight_tensors(model)
    names = list(weights) if names is None else names
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"no 2-D weight named {missing[0]!r} in the model")
    chosen = available_types() if types is None else types
    params = {n: weights[n] for n in names}
    fisher, positions = fisher_diagonal(model, blocks, params, prefix=prefix, seed=seed, advance=advance)
    tensors = []
    for name in names:
        costs = type_costs(params[name], fisher.pop(name), chosen, seed)
        tensors.append(TensorCost(name, tuple(params[name].shape), costs))
    notes = []
    skipped = [t for t in QUANT_TYPES if t not in chosen]
    if types is None and skipped:
        notes.append(f"not measured (no reference encoder in this build): {', '.join(skipped)}")
    seconds = time.perf_counter() - started
    logger.info("tensor sensitivity: %d tensors x %d types in %.0f s", len(tensors), len(chosen), seconds)
    return TensorSensitivity(tensors, positions, int(blocks.shape[0]), seconds, notes)


def sensitivity_seconds(shapes: list[tuple[int, int]], types: int, tokens: int, forward_tps: float) -> float:
    """Estimated wall time of `tensor_sensitivity` on matrices of `shapes` [out, in]: forward +
    backward over the tokens and the reference quantization of the drawn rows (at most: draws
    with replacement repeat rows) in every type (plus f16)."""
    weights = sum(draws(rows) * cols for rows, cols in shapes)
    return FORWARDS_PER_BLOCK * tokens / forward_tps + weights * (types + 1) * QUANTIZE_S_PER_WEIGHT
