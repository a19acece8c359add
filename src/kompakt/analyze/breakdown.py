"""Where the parameters and bytes of a model are: by component and by decoder layer.

Components: embeddings, attention, mlp, norms, lm_head (and "other" for anything outside the
layer stack, e.g. a vision tower, or a BERT pooler that sentence embeddings do not use). An
encoder's position and token-type tables count as embeddings. Tied input/output embeddings are one tensor: counted once,
under embeddings, and `tied_embeddings` says so. Bytes are parameters x the storage element
size (what a saved copy takes); `disk_bytes` is what the weight files on disk take now, counted
by `kompakt.evaluate.disk_bytes` (the same count the run lineage and the report use).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from kompakt.evaluate.size import disk_bytes
from kompakt.model.arch import arch_for, decoder_layers, embeddings_tied

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")


@dataclass
class Breakdown:
    """Parameter and byte counts. `per_layer[i]` maps component -> parameters of layer i."""

    total_params: int
    total_bytes: int
    storage_dtype: str
    bytes_per_param: int
    params: dict[str, int]
    bytes: dict[str, int]
    per_layer: list[dict[str, int]]
    tied_embeddings: bool
    disk_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def share(self, component: str) -> float:
        """Fraction of all parameters in `component`."""
        return self.params.get(component, 0) / max(1, self.total_params)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Breakdown:
        return cls(**data)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_BLOCK_NORMS = ("attn.pre", "attn.post", "mlp.pre", "mlp.post")


def _in_layer(rest: str, spec, tensor: torch.Tensor) -> str:
    """Component of a parameter inside a layer. The Linears' roles decide first: a BERT layer's
    FFN output Linear (`output.dense`) and its post-residual LayerNorms sit outside the
    `attention` / `intermediate` submodules the path prefixes name."""
    for role, path in spec.linear_paths.items():
        if rest.startswith(path + "."):
            return "attention" if role.startswith("attn.") else "mlp"
    if any(rest.startswith(spec.norm_paths[role] + ".") for role in _BLOCK_NORMS if role in spec.norm_paths):
        return "norms"
    if rest.startswith(spec.attn + "."):
        return "attention"
    if rest.startswith(spec.mlp + "."):
        return "mlp"
    # Whatever else a decoder layer holds is its norms (1-D scales); anything 2-D is unusual.
    return "norms" if tensor.dim() == 1 else "other"


def _classify(name: str, spec, tensor: torch.Tensor) -> tuple[str, int | None]:
    """(component, layer index or None) of a parameter by its dotted name."""
    layers_prefix = spec.layers + "."
    if name.startswith(layers_prefix):
        index_text, _, rest = name[len(layers_prefix) :].partition(".")
        return _in_layer(rest, spec, tensor), int(index_text)
    if name.startswith(spec.embed + "."):
        return "embeddings", None
    embeddings_module = spec.embed.rpartition(".")[0]
    if spec.encoder and embeddings_module and name.startswith(embeddings_module + "."):
        # An encoder's embeddings module also holds position and token-type tables and a LayerNorm.
        return ("embeddings" if tensor.dim() == 2 else "norms"), None
    if spec.lm_head and name.startswith(spec.lm_head + "."):
        return "lm_head", None
    if spec.final_norm and name.startswith(spec.final_norm + "."):
        return "norms", None
    return "other", None


def breakdown(loaded) -> Breakdown:
    """Count parameters and storage bytes of `loaded` (a LoadedModel) by component and layer."""
    model = loaded.model
    spec = arch_for(model)
    n_layers = len(decoder_layers(model))
    per_layer = [dict.fromkeys(("attention", "mlp", "norms", "other"), 0) for _ in range(n_layers)]
    params = dict.fromkeys(COMPONENTS, 0)
    # named_parameters() yields a shared tensor once, so tied embeddings are counted once.
    for name, tensor in model.named_parameters():
        component, index = _classify(name, spec, tensor)
        params[component] += tensor.numel()
        if index is not None:
            per_layer[index][component] += tensor.numel()
    for row in per_layer:
        row["total"] = sum(row.values())
    size = element_size(loaded.storage_dtype)
    tied = embeddings_tied(model)
    notes = []
    if tied:
        notes.append("input and output embeddings are tied: one matrix, counted once under embeddings")
    total = sum(params.values())
    return Breakdown(
        total_params=total,
        total_bytes=total * size,
        storage_dtype=str(loaded.storage_dtype).removeprefix("torch."),
        bytes_per_param=size,
        params=params,
        bytes={name: count * size for name, count in params.items()},
        per_layer=per_layer,
        tied_embeddings=tied,
        disk_bytes=disk_bytes(loaded.path),
        notes=notes,
    )

