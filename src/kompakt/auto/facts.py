"""What the planner knows about a model before shrinking it: sizes per storage format, the
layer-wise numbers of a (light) phase-1 analysis, and how fast this machine runs it.

Sizes are the bytes of the GGUF file export writes (kompakt.auto.gguf_bytes: the export's own
tensor plan plus its header), split into embedding, decoder layers and the rest, and for
models llama.cpp cannot run, from the compressed-tensors layout (packed integers + fp16 scales
per group of 64).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from kompakt.model.loaded import LoadedModel

logger = logging.getLogger(__name__)

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
    forward_tps: float  # batch forward tokens/s, output layer included (fp32, this machine, the threads in use)
    skip_kl: list[float] = field(default_factory=list)  # KL when layer i is replaced by identity
    quant_kl: list[float] = field(default_factory=list)  # KL when only layer i is 4-bit RTN
    block_influence: list[float] = field(default_factory=list)
    # GGUF type -> kompakt.auto.gguf_bytes.GGUFBytes as a dict (total, other, embedding, layers, ...)
    gguf_parts: dict[str, dict] = field(default_factory=dict)
    decoder_tps: float = 0.0  # the same forward without the output layer (what calibration passes run)
    score_tps: float = 0.0  # forward + bucketed KL against the reference (evaluation, analysis edits)
    # Per-tensor GGUF costs for the mixed-precision allocation (kompakt.auto.mixed): one dict per
    # weight matrix of the file {name, gguf_name, shape, kl: {type: predicted RTN KL}, bytes:
    # {type: bytes in the file}}, and the file's bytes no type choice changes.
    tensors: list[dict] = field(default_factory=list)
    gguf_fixed_bytes: int = 0  # the GGUF file outside the weight matrices (no type-source keys)
    gguf_header_bytes: int = 0  # its header, unpadded (to add the type-source keys exactly)
    gguf_align: int = 32
    sensitivity_notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def quant_formats(self) -> list[str]:
        """Formats the planner may pick, gentlest (largest) first."""
        return ["q8_0", "q4_0"] if self.gguf else ["int8", "int4"]

    def layer_bytes(self, fmt: str) -> float:
        """Bytes of the decoder layers alone in `fmt` (what pruning layers or channels removes)."""
        if fmt in self.gguf_parts:
            return self.gguf_parts[fmt]["layers"]
        return sum(self.layer_params) * INT_BITS[fmt] / 8

    @property
    def calibration_tps(self) -> float:
        """Tokens/s of the layer-by-layer passes (no output layer), for their time estimates."""
        return self.decoder_tps or self.forward_tps

    @property
    def scoring_tps(self) -> float:
        """Tokens/s of a forward scored against the reference's top-k (evaluation, analysis)."""
        return self.score_tps or self.forward_tps

    def size_factor(self, fmt: str, params_kept: float = 1.0) -> float:
        """fp16 bytes / bytes in `fmt` when a fraction `params_kept` of the decoder-layer parameters is kept."""
        return self.fp16_bytes / (self.format_bytes[fmt] - self.layer_bytes(fmt) * (1 - params_kept))


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
def throughput(loaded: LoadedModel, tokens: int = 512, batch: int = 2) -> tuple[float, float]:
    """(forward tokens/s, scored tokens/s): one batch forward timed after a warm-up, and the
    same plus bucketed KL against a reference (what each evaluation and analysis edit runs)."""
    from kompakt.evaluate.topk import TOP_K, TopK, bucketed_kl

    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    length = max(8, tokens // batch)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    loaded.model(input_ids=ids[:, :8], use_cache=False)
    start = time.perf_counter()
    logits = loaded.model(input_ids=ids, use_cache=False).logits.reshape(ids.numel(), -1)
    forward = max(1e-6, time.perf_counter() - start)
    targets = ids.reshape(-1)
    reference = TopK.from_logits(logits[:1], targets[:1], TOP_K)  # one row, repeated: the cost is the candidate's
    reference = TopK(*(t.expand(ids.numel(), *t.shape[1:]) for t in (reference.indices, reference.log_probs,
                       reference.rest_mass, reference.target_log_probs)), vocab)  # fmt: skip
    start = time.perf_counter()
    bucketed_kl(reference, logits, targets)
    return ids.numel() / forward, ids.numel() / (forward + time.perf_counter() - start)


def decoder_share(loaded: LoadedModel) -> float:
    """The decoder layers' share of a forward's multiply-adds (the rest is the output layer)."""
    layers = sum(layer_parameter_counts(loaded))
    head = int(loaded.model.get_output_embeddings().weight.numel())
    return layers / (layers + head)


def model_facts(loaded: LoadedModel, forward_tps: float | None = None) -> ModelFacts:
    """Sizes and shape (no data needed); throughput measured here unless `forward_tps` is given
    (then it stands for every kind of forward)."""
    from kompakt.auto.gguf_bytes import gguf_bytes, tensor_layout
    from kompakt.scoring.tensor_sensitivity import available_types

    params = loaded.num_parameters()
    layer_params = layer_parameter_counts(loaded)
    gguf = gguf_bytes(loaded)
    layout = tensor_layout(loaded) if gguf is not None else None
    formats = {fmt: size.total for fmt, size in (gguf or {}).items()}
    formats.update(_int_bytes(loaded))
    embed = int(loaded.model.get_input_embeddings().weight.numel())
    forward, scored = (forward_tps, forward_tps) if forward_tps is not None else throughput(loaded)
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
        forward_tps=forward,
        gguf_parts={fmt: size.to_dict() for fmt, size in (gguf or {}).items()},
        # Timing the decoder alone is as noisy as the forward; the multiply-add split is not.
        decoder_tps=forward if forward_tps is not None else forward / decoder_share(loaded),
        score_tps=scored,
        tensors=tensor_entries(layout, available_types()) if layout is not None else [],
        gguf_fixed_bytes=layout.fixed if layout is not None else 0,
        gguf_header_bytes=layout.header if layout is not None else 0,
        gguf_align=layout.align if layout is not None else 32,
    )


def tensor_entries(layout, types: tuple[str, ...]) -> list[dict]:
    """The facts' per-tensor entries from the export's layout: bytes of every type in `types`
    (plus f16) whose blocks fit the rows; `kl` is filled by add_tensor_sensitivity."""
    from kompakt.ops.ggml_types import ggml_type

    entries = []
    for name, (gguf_name, shape) in layout.tensors.items():
        fitting = ["f16", *(t for t in types if ggml_type(t).fits(int(shape[-1])))]
        entries.append({"name": name, "gguf_name": gguf_name, "shape": list(shape), "kl": {},
                        "bytes": {t: layout.tensor_bytes(name, t) for t in fitting}})  # fmt: skip
    return entries


def add_tensor_sensitivity(facts: ModelFacts, sensitivity) -> ModelFacts:
    """Copy each tensor's predicted KL per type (kompakt.scoring.tensor_sensitivity) beside its
    bytes (types the facts have no bytes for are left out)."""
    costs = {cost.name: cost.kl for cost in sensitivity.tensors}
    for entry in facts.tensors:
        entry["kl"] = {t: v for t, v in costs.get(entry["name"], {}).items() if t in entry["bytes"]}
    facts.sensitivity_notes = [
        f"per-tensor sensitivity: Fisher of the model's own predictions on {sensitivity.tokens} calibration tokens "
        f"({sensitivity.blocks} blocks) x llama.cpp's reference rounding error per type, {sensitivity.seconds:.0f} s",
        *sensitivity.notes,
    ]
    return facts


def add_analysis(facts: ModelFacts, analysis) -> ModelFacts:
    """Copy the per-layer numbers the planner uses out of a phase-1 `Analysis`."""
    facts.skip_kl = [float(row["skip"]["kl"]) for row in analysis.layers]
    facts.quant_kl = [float(row["quant"]["kl"]) for row in analysis.layers]
    facts.block_influence = [float(row["block_influence"]) for row in analysis.layers]
    return facts
