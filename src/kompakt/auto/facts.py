"""What the planner knows about a model before shrinking it: sizes per storage format, the
layer-wise numbers of a (light) phase-1 analysis, and how fast this machine runs it.

Sizes are computed from the same tensor plan the GGUF export uses (so a planned Q4_0 size is
the size of the file export will write), and for models llama.cpp cannot run, from the
compressed-tensors layout (packed integers + fp16 scales per group of 64).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

# bits per weight of each storage type (GGUF blocks of 32: fp16 scale, + fp16 min for q4_1)
BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_1": 5.0, "q4_0": 4.5}
# compressed-tensors int grids with one fp16 scale per 64 weights (the fallback without GGUF)
INT_BITS = {"int8": 8.25, "int4": 4.25}


@dataclass
class ModelFacts:
    """Sizes, shape and measured per-layer costs of one model (JSON-able)."""

    name: str
    fingerprint: str
    params: int
    fp16_bytes: int
    layers: int
    layer_params: list[int]
    embedding_params: int
    gguf: bool  # llama.cpp can run this family / structure
    format_bytes: dict[str, int]  # storage format -> bytes of the whole model
    forward_tps: float  # batch forward tokens/s (fp32, this machine, the threads in use)
    skip_kl: list[float] = field(default_factory=list)  # KL when layer i is replaced by identity
    quant_kl: list[float] = field(default_factory=list)  # KL when only layer i is 4-bit RTN g64
    block_influence: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def quant_formats(self) -> list[str]:
        """Formats the planner may pick, gentlest (largest) first."""
        return ["q8_0", "q4_0"] if self.gguf else ["int8", "int4"]

    def layer_bytes(self, fmt: str) -> float:
        """Bytes of the decoder layers alone in `fmt` (what pruning layers or channels removes)."""
        return sum(self.layer_params) * {**BITS, **INT_BITS}[fmt] / 8

    def size_factor(self, fmt: str, params_kept: float = 1.0) -> float:
        """fp16 bytes / bytes in `fmt` when a fraction `params_kept` of the decoder-layer parameters is kept."""
        return self.fp16_bytes / (self.format_bytes[fmt] - self.layer_bytes(fmt) * (1 - params_kept))


def _gguf_bytes(loaded: LoadedModel) -> dict[str, int] | None:
    """Bytes of a GGUF export per type, from the export's own tensor plan; None when it cannot export."""
    from kompakt.errors import KompaktError
    from kompakt.export.gguf import prepare_gguf

    sizes = {}
    try:
        for fmt in ("f16", "q8_0", "q4_0"):
            *_, plan = prepare_gguf(loaded, fmt)
            sizes[fmt] = int(sum(math.prod(t.shape) * BITS[t.type] / 8 for t in plan.tensors))
    except KompaktError as error:
        logger.info("no GGUF sizes: %s", error)
        return None
    return sizes


def _int_bytes(loaded: LoadedModel) -> dict[str, int]:
    """compressed-tensors sizes: decoder Linears packed, everything else in fp16."""
    from kompakt.model.arch import decoder_layers

    linear = sum(
        module.weight.numel()
        for layer in decoder_layers(loaded.model)
        for module in layer.modules()
        if isinstance(module, torch.nn.Linear)
    )
    rest = loaded.num_parameters() - linear
    return {fmt: int(linear * bits / 8 + rest * 2) for fmt, bits in INT_BITS.items()}


def layer_parameter_counts(loaded: LoadedModel) -> list[int]:
    from kompakt.model.arch import decoder_layers

    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(loaded.model)]


@torch.inference_mode()
def forward_tokens_per_s(loaded: LoadedModel, tokens: int = 512, batch: int = 2) -> float:
    """Batch forward throughput, timed once after a warm-up (what calibration passes run at)."""
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    length = max(8, tokens // batch)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    loaded.model(input_ids=ids[:, :8], use_cache=False)
    start = time.perf_counter()
    loaded.model(input_ids=ids, use_cache=False)
    return ids.numel() / max(1e-6, time.perf_counter() - start)


def model_facts(loaded: LoadedModel, forward_tps: float | None = None) -> ModelFacts:
    """Sizes and shape (no data needed); `forward_tps` measured here unless given."""
    params = loaded.num_parameters()
    layer_params = layer_parameter_counts(loaded)
    gguf = _gguf_bytes(loaded)
    formats = dict(gguf) if gguf else {}
    formats.update(_int_bytes(loaded))
    embed = int(loaded.model.get_input_embeddings().weight.numel())
    return ModelFacts(
        name=loaded.name,
        fingerprint=loaded.fingerprint(),
        params=params,
        fp16_bytes=params * 2,
        layers=len(layer_params),
        layer_params=layer_params,
        embedding_params=embed,
        gguf=gguf is not None,
        format_bytes=formats,
        forward_tps=forward_tps if forward_tps is not None else forward_tokens_per_s(loaded),
    )


def add_analysis(facts: ModelFacts, analysis) -> ModelFacts:
    """Copy the per-layer numbers the planner uses out of a phase-1 `Analysis`."""
    facts.skip_kl = [float(row["skip"]["kl"]) for row in analysis.layers]
    facts.quant_kl = [float(row["quant"]["kl"]) for row in analysis.layers]
    facts.block_influence = [float(row["block_influence"]) for row in analysis.layers]
    return facts
