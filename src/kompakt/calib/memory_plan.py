"""Predicted peak memory and time of a compression step, from shapes, before any work.

    shapes = ModelShapes.from_lazy(open_lazy("Llama-2-7b-hf"))        # headers only
    step = estimate_step("quant.gptq", shapes, tokens=16 * 512, streamed=True, hessians=True)
    step.line()   # 'quant.gptq (streamed): peak ≈ 2.3 GB (weights 0.81 GB, activations 0.27 GB, ...), ≈ 9.5 min'
    check_budget([step], parse_size("1GB"))    # ConfigError: one layer and its activations do not fit

What a step holds at its peak (the terms are those of llm-compressor's sequential pipeline and
of kompakt.calib.sequential):

- weights: a streamed step holds one decoder layer in the compute dtype (the layer is read,
  changed, written, released); an in-memory step the whole model. The embedding is held only
  while layer 0's inputs are computed, before any layer: a separate, smaller peak (capture).
- activations: in RAM, the calibration inputs of the current layer and its outputs (the next
  layer's inputs), n x len x hidden each in the compute dtype; spilled to disk
  (kompakt.calib.spill), one batch of them plus its MLP intermediates.
- hessians (GPTQ, SparseGPT): the largest group's solve: its in x in fp32 Hessian (factorised in
  its own memory, kompakt.ops.hessian) and the stacked rows of its Linears in fp32 and their codes
  (int8): 5 bytes per weight; plus the int8 codes of the layer's solved Linears waiting to be
  written (1 byte per layer parameter).
- output: a streamed step's finished layers wait in the shard buffer until FLUSH_BYTES are
  pending (kompakt.model.stream_save; a resumable step writes every layer at once).
- process: torch and transformers themselves (PROCESS_BYTES).

Checked against bench/stream_big.py (tests/calib/test_memory_plan.py: the 7B shapes' measured
peak RSS within 30 %).

Time: the floating-point operations of the calibration forward (2 x parameters per token, and the
attention scores), divided by the matrix-multiply throughput measured on this machine in the
compute dtype (measure_flops), plus those of the Hessian accumulation (2 x tokens x in^2 per group)
and the GPTQ solve (in^3 / 3 for the Cholesky factor and out x in^2 for the column updates),
always fp32, divided by the fp32 throughput; all of it divided by an efficiency factor
(EFFICIENCY: real layers do not run at peak GEMM speed). Disk reads are not counted. The Hessian
term counts the whole product, as when EFFICIENCY was fitted to measured runs; the accumulator
now computes only the blocks on and above the diagonal (kompakt.ops.hessian), so that term is
high by up to a third (a few % of a 7B layer's time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kompakt.errors import ConfigError
from kompakt.units import duration, size

PROCESS_BYTES = 500 * 10**6  # torch + transformers + tokenizer, measured RSS of an idle kompakt process
# Share of the measured GEMM rate a whole streamed step reaches (disk reads and spills included).
# Fitted on bench/stream_big.py --preset llama2-7b --layers 2 (16 x 512 tokens, batch 4, 2 threads,
# alone on the machine): GPTQ took 163.6 s at a measured 431 GFLOP/s, predicted 77 s at 0.47.
EFFICIENCY = 0.22


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs of a decoder-only model: sizes, never weights."""

    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: int  # parameters of one decoder layer
    total_params: int  # all parameters (tied once)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def largest_linear(self) -> int:
        """Parameters of the largest single Linear (the MLP's, in the Llama layout)."""
        return max(self.hidden * self.intermediate, self.hidden * self.heads * self.head_dim)

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """From a (text) config, the Llama layout assumed (q, k, v, o, gate, up, down, two norms)."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, inter = int(c.hidden_size), int(c.intermediate_size)
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        dim = int(getattr(c, "head_dim", None) or hidden // heads)
        layer = hidden * dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
        vocab = int(c.vocab_size)
        head = 0 if getattr(c, "tie_word_embeddings", False) else vocab * hidden
        total = int(c.num_hidden_layers) * layer + vocab * hidden + head + hidden
        return cls(int(c.num_hidden_layers), hidden, inter, heads, kv, dim, vocab, layer, total)

    @classmethod
    def from_lazy(cls, lazy: Any) -> ModelShapes:
        """From a lazily opened model (kompakt.model.lazy): exact parameter counts from the headers."""
        shapes = cls.from_config(lazy.config)
        layer = max(lazy.layer_bytes(i, torch.float32) // 4 for i in range(lazy.n_layers))
        return cls(**{**shapes.__dict__, "layer_params": int(layer), "total_params": int(lazy.parameter_count())})

    def linear_groups(self) -> list[tuple[int, int]]:
        """(input width, output rows) of each group of Linears sharing an input, per layer."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return [(self.hidden, q_out + 2 * kv_out), (q_out, self.hidden), (self.hidden, 2 * self.intermediate),
                (self.intermediate, self.hidden)]  # fmt: skip


@dataclass
class StepEstimate:
    """Predicted peak bytes (by what holds them) and seconds of one step; on a GPU
    (kompakt.calib.gpu_plan) also its GPU memory, and seconds None where not predicted."""

    step: str
    mode: str  # "streamed" | "in memory" | "streamed on the GPU"
    parts: dict[str, int] = field(default_factory=dict)  # weights, activations, hessians, output, process
    seconds: float | None = 0.0
    gpu_parts: dict[str, int] = field(default_factory=dict)  # weights, activations, caches, hessians

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def peak_gpu_bytes(self) -> int:
        return sum(self.gpu_parts.values())

    def line(self) -> str:
        text = f"{self.step} ({self.mode}): peak ≈ {size(self.peak_bytes)} ({_listed(self.parts)})"
        if self.gpu_parts:
            text += f"; GPU ≈ {size(self.peak_gpu_bytes)} ({_listed(self.gpu_parts)})"
        return text + (f", ≈ {duration(self.seconds)}" if self.seconds is not None else ", time not predicted")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "mode": self.mode, "peak_bytes": self.peak_bytes, "parts": dict(self.parts),
                "seconds": self.seconds, "peak_gpu_bytes": self.peak_gpu_bytes, "gpu_parts": dict(self.gpu_parts)}  # fmt: skip


def _listed(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {size(n)}" for name, n in parts.items() if n)


def estimate_step(step: str, shapes: ModelShapes, *, tokens: int = 0, seq_len: int = 512, streamed: bool = False,
                  hessians: bool = False, dtype: torch.dtype = torch.float32, stored: torch.dtype = torch.bfloat16,
                  flops: float | None = None, spilled: bool = False, batch: int = 8,
                  fp32_flops: float | None = None) -> StepEstimate:  # fmt: skip
    """The estimate of one step (module docstring). `tokens`: calibration tokens (n x len; 0 for
    a step without calibration); `hessians`: the step solves with Hessians (GPTQ, SparseGPT);
    `flops`: the measured matrix-multiply rate in `dtype` (measure_flops() when None), `fp32_flops`
    the fp32 one (the same when `dtype` is fp32); `spilled`: the
    activations are on disk, `batch` blocks of `seq_len` in memory at a time."""
    from kompakt.model.stream_save import FLUSH_BYTES

    item = dtype.itemsize
    layer = shapes.layer_params * item
    if spilled and tokens:
        in_flight = min(tokens, batch * seq_len)
        activations = (2 * shapes.hidden + 3 * shapes.intermediate) * in_flight * item
    else:
        activations = 2 * tokens * shapes.hidden * item
    parts = {
        "weights": layer if streamed else shapes.total_params * item,
        "activations": activations,
        "hessians": solve_bytes(shapes) + shapes.layer_params if hessians and tokens else 0,
        "output": min(FLUSH_BYTES, shapes.total_params * stored.itemsize) if streamed else 0,
        "process": PROCESS_BYTES,
    }
    if streamed and tokens:  # the capture (the embedding, read and cast, and every block's layer-0 input)
        capture = {"weights": shapes.embed_params * (item + stored.itemsize), "activations": tokens * shapes.hidden * item,
                   "process": PROCESS_BYTES}  # fmt: skip
        parts = capture if sum(capture.values()) > sum(parts.values()) else parts
    forward, fp32_work = _step_flops(shapes, tokens, seq_len, hessians)
    seconds = 0.0
    if forward or fp32_work:  # no calibration: no time, and no throughput to measure
        rate = flops or measure_flops(dtype)
        fp32_rate = rate if dtype == torch.float32 else fp32_flops or measure_flops(torch.float32)  # Hessians, solves
        seconds = (forward / rate + fp32_work / fp32_rate) / EFFICIENCY
    return StepEstimate(step, "streamed" if streamed else "in memory", parts, seconds)


def solve_bytes(shapes: ModelShapes) -> int:
    """The largest group solve (kompakt.ops.gptq): its fp32 Hessian, factorised and inverted in
    place, plus 5 bytes per weight (the fp32 rows, updated in place, and their int8 codes)."""
    return max(4 * width * width + 5 * width * rows for width, rows in shapes.linear_groups())


def _step_flops(shapes: ModelShapes, tokens: int, seq_len: int, hessians: bool) -> tuple[float, float]:
    """(the calibration forward's operations, in the compute dtype; the Hessians' and solves', in fp32)."""
    if not tokens:
        return 0.0, 0.0
    attention = 4 * tokens * seq_len * shapes.heads * shapes.head_dim  # scores and weighted sum
    forward = 2 * shapes.layer_params * tokens + attention
    solve = 0.0
    if hessians:
        for width, rows in shapes.linear_groups():
            solve += 2 * tokens * width**2 + width**3 / 3 + rows * width**2
    return float(forward * shapes.n_layers), float(solve * shapes.n_layers)


_FLOPS: dict[tuple[torch.dtype, int], float] = {}


def measure_flops(dtype: torch.dtype = torch.float32, n: int = 512) -> float:
    """Matrix-multiply rate of this machine in floating-point operations per second (best of a
    few n x n products at the current thread count; measured once per process and dtype)."""
    key = (dtype, torch.get_num_threads())
    if key not in _FLOPS:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        _FLOPS[key] = 2 * n**3 / max(best, 1e-9)
    return _FLOPS[key]


def minimum_bytes(shapes: ModelShapes, *, tokens: int, hessians: bool, dtype: torch.dtype = torch.float32) -> int:
    """The least a streamed calibration step can run in: one layer and its activations (and
    Hessians), the process and the output buffer (estimate_step's streamed peak)."""
    return estimate_step("", shapes, tokens=tokens, streamed=True, hessians=hessians, dtype=dtype, flops=1.0).peak_bytes


def check_budget(estimates: list[StepEstimate], budget: int | None, *, gpu: bool = False) -> None:
    """ConfigError (one line, before any work) when a step does not fit `budget` bytes even
    streamed: the budget cannot hold one layer plus its activations. `gpu`: the steps' GPU memory
    is checked against --max-gpu-memory instead of their RAM against --max-memory."""
    if budget is None:
        return
    flag = "--max-gpu-memory" if gpu else "--max-memory"
    for estimate in estimates:
        parts = estimate.gpu_parts if gpu else estimate.parts
        if sum(parts.values()) > budget:
            raise ConfigError(
                f"{flag} {size(budget)} cannot hold {estimate.step} {estimate.mode}: it needs ≈ "
                f"{size(sum(parts.values()))} ({_listed(parts)}); "
                "raise the budget or use fewer calibration blocks (data.calibration_blocks)"
            )
