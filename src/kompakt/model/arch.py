"""Architecture knowledge as data: where each supported family keeps its layers and Linears.

Every pass, analysis or surgery that needs "the q projection of layer 3" asks this table,
never the class name. An entry is keyed by `config.model_type`. Paths are dotted:
`layers`, `embed`, `final_norm`, `lm_head` are relative to the model; everything else is
relative to one decoder layer (e.g. `q = "self_attn.q_proj"`).

Linear roles (keys of `linear_modules`): "attn.q", "attn.k", "attn.v", "attn.o" or the
fused "attn.qkv" (Phi-3: rows [q | k | v]); "mlp.gate", "mlp.up", "mlp.down" or the fused
"mlp.gate_up" (Phi-3: rows [gate | up]).

Norm roles (keys of `norm_modules`): "attn.pre" (feeds q/k/v), "mlp.pre" (feeds gate/up);
Gemma 2/3 also normalise block outputs: "attn.post", "mlp.post"; Gemma 3 / Qwen 3 have
per-head "attn.q_norm", "attn.k_norm" (OLMoE's act on the whole projection and are built with
hidden_size channels, hence its `head_dim_from_hidden`). Beware: in Llama `post_attention_layernorm` is the
pre-MLP norm, in Gemma 2/3 it normalises the attention output — hence roles, not names.

Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) carry a `MoESpec`: the MLP of
a layer is a sparse block whose experts transformers 5 stores fused, as 3-D parameters of one
`*Experts` module (`gate_up_proj` [E, 2I, H] with rows [gate | up] per expert, `down_proj`
[E, H, I]), routed by a `*TopKRouter` whose `weight` [E, H] is a plain Parameter, not a Linear.
Their dense MLP roles ("mlp.gate", ...) are None; a shared expert (Qwen2-MoE) is an ordinary
MLP whose Linears have the roles "mlp.shared_gate" / "mlp.shared_up" / "mlp.shared_down".
`kompakt.model.moe` reads and edits experts through this spec.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from kompakt.errors import UnsupportedArchitectureError
from kompakt.model.lowrank import LowRankLinear


@dataclass(frozen=True)
class MoESpec:
    """Where a sparse MoE block keeps its router, experts and shared expert (paths relative to a
    decoder layer), and which config keys size it.

    Attributes:
        block: the sparse MoE block (replaces the dense MLP).
        router: the top-k router; its `weight` [num_experts, hidden] scores the experts.
        experts: the fused experts module; `gate_up` [E, 2I, H] (rows [gate | up]) and `down`
            [E, H, I] name its 3-D parameters.
        num_experts_key / top_k_key / intermediate_key: config keys of the expert count, the
            experts chosen per token and one expert's width.
        renormalize: whether the chosen top-k probabilities are rescaled to sum to 1: True / False,
            or the config key that says so (Qwen / OLMoE: norm_topk_prob).
        count_attrs / top_k_attrs: attributes of modules inside the block that cache the expert
            count / top-k from the config (edited together with the config).
        shared_expert / shared_gate: Qwen2-MoE's always-on expert (an MLP of gate/up/down Linears)
            and its sigmoid gate Linear [1, hidden]; `shared_intermediate_key` its width.
        dense_layer_keys: config keys that make some layers dense MLPs (Qwen: mlp_only_layers,
            decoder_sparse_step); kompakt requires every layer sparse.
    """

    block: str = "mlp"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    intermediate_key: str = "moe_intermediate_size"
    renormalize: bool | str = "norm_topk_prob"
    count_attrs: tuple[str, ...] = ("num_experts",)
    top_k_attrs: tuple[str, ...] = ("top_k",)
    shared_expert: str | None = None
    shared_gate: str | None = None
    shared_intermediate_key: str | None = None
    dense_layer_keys: tuple[str, ...] = ()

    @property
    def shared_linear_paths(self) -> dict[str, str]:
        """Role -> path of the shared expert's Linears (empty without a shared expert)."""
        if self.shared_expert is None:
            return {}
        base = self.shared_expert
        return {"mlp.shared_gate": f"{base}.gate_proj", "mlp.shared_up": f"{base}.up_proj",
                "mlp.shared_down": f"{base}.down_proj"}  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its parts (see the module docstring for conventions).

    Attributes:
        family: the transformers model_type this entry describes.
        norm_offset: RMSNorm computes x * (norm_offset + weight): 1.0 for Gemma, else 0.0.
            Folding a scale s into a norm therefore means w' = (offset + w) * s - offset.
        embed_scale: embeddings are multiplied by sqrt(hidden_size) inside the model (Gemma).
        layer_config_lists: config keys holding one entry per layer (e.g. "layer_types"),
            which surgery must edit together with `layers`.
        hidden_outputs: parameters outside the decoder whose last dimension is the hidden size
            (Gemma 3's multimodal projector writes image features into the residual stream),
            which hidden-size surgery must slice with the embeddings.
        fp16_overflows: activations exceed fp16's range (Gemma: NaN logits in float16), so
            16-bit copies of its weights are stored in bfloat16, which plain transformers then
            computes in.
        encoder: a bidirectional sentence encoder (BERT family) loaded as the transformers base
            model (AutoModel), without an LM head: paths are relative to that base model,
            `final_norm` / `lm_head` are None (BERT has neither). BERT-style encoders are post-LN:
            their "attn.pre" / "mlp.pre" roles name the LayerNorms *after* each residual add, so
            passes that fold scales into a pre-norm (AWQ) must not run on them.
        intermediate_key: the config key of the MLP width (DistilBERT calls it hidden_dim).
        head_dim_from_hidden: transformers computes the head size as hidden_size /
            num_attention_heads (no head_dim setting: the BERT family, ModernBERT), so heads, or
            hidden channels, cannot be removed alone without changing every head's size.
        stores_packed: a quantized step can be stored packed (compressed-tensors). False for
            ModernBERT: transformers 5's ModernBERT weight init reads `.weight` of every Wqkv / Wi /
            Wo, which compressed-tensors' packed Linears lack, so such a directory cannot load; its
            quantized steps are stored dense (the exact dequantized values, fp32).
        moe: the sparse MoE layout (None for dense families); see MoESpec.
    """

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str | None = "model.norm"
    lm_head: str | None = "lm_head"
    attn: str = "self_attn"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None
    mlp: str = "mlp"
    gate: str | None = "mlp.gate_proj"
    up: str | None = "mlp.up_proj"
    down: str | None = "mlp.down_proj"
    gate_up: str | None = None
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    norm_offset: float = 0.0
    embed_scale: bool = False
    layer_config_lists: tuple[str, ...] = ()
    hidden_outputs: tuple[str, ...] = ()
    fp16_overflows: bool = False
    encoder: bool = False
    intermediate_key: str = "intermediate_size"
    head_dim_from_hidden: bool = False
    stores_packed: bool = True
    moe: MoESpec | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.qkv is not None

    @property
    def fused_gate_up(self) -> bool:
        return self.gate_up is not None

    @property
    def linear_paths(self) -> dict[str, str]:
        """Role -> path relative to a decoder layer, for every Linear of the layer."""
        roles = {
            "attn.q": self.q, "attn.k": self.k, "attn.v": self.v, "attn.qkv": self.qkv,
            "attn.o": self.o,
            "mlp.gate": self.gate, "mlp.up": self.up, "mlp.gate_up": self.gate_up,
            "mlp.down": self.down,
        }  # fmt: skip
        if self.moe is not None:
            roles.update(self.moe.shared_linear_paths)
        return {role: path for role, path in roles.items() if path is not None}

    @property
    def norm_paths(self) -> dict[str, str]:
        """Role -> path relative to a decoder layer, for every norm of the layer."""
        roles = {
            "attn.pre": self.attn_norm, "attn.post": self.attn_post_norm,
            "mlp.pre": self.mlp_norm, "mlp.post": self.mlp_post_norm,
            "attn.q_norm": self.q_norm, "attn.k_norm": self.k_norm,
        }  # fmt: skip
        return {role: path for role, path in roles.items() if path is not None}


# The Llama layout is the default every other entry starts from.
LLAMA = ArchSpec(family="llama")
_GEMMA2_NORMS = dict(
    mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    embed_scale=True,
    layer_config_lists=("layer_types",),
    fp16_overflows=True,
)
_GEMMA3_TEXT = replace(
    LLAMA, family="gemma3_text", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", **_GEMMA2_NORMS
)
_LM = "model.language_model"
_MOE = dict(gate=None, up=None, down=None)  # the MLP is a sparse block: no dense MLP Linears
_QWEN_MOE = MoESpec(dense_layer_keys=("mlp_only_layers", "decoder_sparse_step"))  # Gemma 3 multimodal: the text model sits under the vision wrapper

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": replace(LLAMA, family="mistral"),
    "qwen2": replace(LLAMA, family="qwen2", layer_config_lists=("layer_types",)),
    "qwen3": replace(
        LLAMA, family="qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
        layer_config_lists=("layer_types",),
    ),
    "phi3": replace(
        LLAMA, family="phi3", q=None, k=None, v=None, qkv="self_attn.qkv_proj",
        gate=None, up=None, gate_up="mlp.gate_up_proj",
    ),
    "gemma": replace(LLAMA, family="gemma", norm_offset=1.0, embed_scale=True, fp16_overflows=True),
    "gemma2": replace(LLAMA, family="gemma2", **_GEMMA2_NORMS),
    "gemma3_text": _GEMMA3_TEXT,
    "gemma3": replace(
        _GEMMA3_TEXT, family="gemma3", layers=f"{_LM}.layers", embed=f"{_LM}.embed_tokens",
        final_norm=f"{_LM}.norm", hidden_outputs=("model.multi_modal_projector.mm_input_projection_weight",),
    ),
    # Mixture of Experts. Mixtral always renormalises the top-k probabilities.
    "mixtral": replace(
        LLAMA, family="mixtral", **_MOE,
        moe=MoESpec(num_experts_key="num_local_experts", intermediate_key="intermediate_size", renormalize=True),
    ),
    "qwen2_moe": replace(
        LLAMA, family="qwen2_moe", layer_config_lists=("layer_types",), **_MOE,
        moe=replace(_QWEN_MOE, shared_expert="mlp.shared_expert", shared_gate="mlp.shared_expert_gate",
                    shared_intermediate_key="shared_expert_intermediate_size"),
    ),
    "qwen3_moe": replace(
        LLAMA, family="qwen3_moe", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", **_MOE, moe=_QWEN_MOE,
    ),
    "olmoe": replace(
        LLAMA, family="olmoe", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", head_dim_from_hidden=True,
        **_MOE, moe=MoESpec(intermediate_key="intermediate_size"),
    ),
}  # fmt: skip

# Sentence encoders (kompakt.model.sentence): the base models AutoModel loads, without heads.
# BERT, RoBERTa and XLM-R share one layout; the LayerNorms sit after each residual add (post-LN).
_BERT = ArchSpec(
    family="bert", layers="encoder.layer", embed="embeddings.word_embeddings", final_norm=None, lm_head=None,
    attn="attention", q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense", mlp="intermediate", gate=None, up="intermediate.dense", down="output.dense",
    attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm", encoder=True, head_dim_from_hidden=True,
)
ENCODER_ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": replace(_BERT, family="roberta"),
    "xlm-roberta": replace(_BERT, family="xlm-roberta"),
    "distilbert": replace(
        _BERT, family="distilbert", layers="transformer.layer", q="attention.q_lin", k="attention.k_lin",
        v="attention.v_lin", o="attention.out_lin", mlp="ffn", up="ffn.lin1", down="ffn.lin2",
        attn_norm="sa_layer_norm", mlp_norm="output_layer_norm", intermediate_key="hidden_dim",
    ),
    # ModernBERT is pre-LN with a GLU MLP: Wi's rows are [activated | linear] = [gate | up].
    "modernbert": replace(
        _BERT, family="modernbert", layers="layers", embed="embeddings.tok_embeddings", final_norm="final_norm",
        attn="attn", q=None, k=None, v=None, qkv="attn.Wqkv", o="attn.Wo", mlp="mlp", up=None,
        gate_up="mlp.Wi", down="mlp.Wo", attn_norm="attn_norm", mlp_norm="mlp_norm", stores_packed=False,
    ),
}  # fmt: skip
DECODER_FAMILIES = tuple(ARCHITECTURES)
MOE_FAMILIES = tuple(family for family, spec in ARCHITECTURES.items() if spec.moe is not None)
ENCODER_FAMILIES = tuple(ENCODER_ARCHITECTURES)
ARCHITECTURES.update(ENCODER_ARCHITECTURES)
SUPPORTED_FAMILIES = tuple(ARCHITECTURES)


def is_encoder_family(model_or_config: Any) -> bool:
    """Whether a model, LoadedModel, config or config.json dict is a sentence-encoder family."""
    return _get(_config_of(model_or_config), "model_type") in ENCODER_ARCHITECTURES


def is_moe(model_or_config: Any) -> bool:
    """Whether a model, LoadedModel, config or config.json dict is a Mixture-of-Experts family."""
    return _get(text_config(model_or_config), "model_type") in MOE_FAMILIES


def _config_of(model_or_config: Any) -> Any:
    """The config behind a LoadedModel, a transformers model, a config or a config.json dict."""
    obj = getattr(model_or_config, "model", model_or_config)  # LoadedModel -> model
    if isinstance(obj, dict):
        return obj
    return getattr(obj, "config", obj)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def unsupported_message(model_type: str | None, config: Any = None) -> str:
    """One line naming the unsupported type and the families kompakt supports."""
    kind = ""
    if config is not None and _get(config, "is_encoder_decoder", False):
        kind = " (encoder-decoder; kompakt shrinks decoder-only causal LMs and sentence encoders)"
    return (
        f"model type {model_type!r} is not supported{kind}; "
        f"use a model of one of these families: {', '.join(SUPPORTED_FAMILIES)}"
    )


def arch_for(model_or_config: Any) -> ArchSpec:
    """The ArchSpec of a model, LoadedModel, config or config.json dict.

    Raises:
        UnsupportedArchitectureError: the model_type is not in the table.
    """
    config = _config_of(model_or_config)
    model_type = _get(config, "model_type")
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(unsupported_message(model_type, config))
    return spec


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path ("model.layers.0.mlp"); "" is root itself."""
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at a dotted path (used to swap Linears for factorized ones)."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder layers of a model (or LoadedModel), in order; an encoder's layers for an encoder."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    return get_submodule(model, arch_for(model).layers)  # type: ignore[return-value]


def linear_modules(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """Role -> Linear of one decoder layer ("attn.q", ..., "mlp.down"; fused roles for Phi-3).

    A factorized Linear (kompakt.model.lowrank) appears as its two factors, ordinary Linears in
    data-flow order: "<role>.0" (A, in -> rank) then "<role>.1" (B, rank -> out), so passes that
    treat Linears (GPTQ, RTN) quantize the factors. `linear_path` maps either kind of role to its path.
    """
    result: dict[str, nn.Linear] = {}
    for role, path in spec.linear_paths.items():
        module = get_submodule(layer, path)
        if isinstance(module, LowRankLinear):
            result.update({f"{role}.{i}": factor for i, factor in enumerate(module)})
        else:
            result[role] = module  # type: ignore[assignment]
    return result


def linear_path(spec: ArchSpec, role: str) -> str:
    """The path of a Linear role relative to a decoder layer; a factor role ("attn.q.0") gets
    its factor's path ("self_attn.q_proj.0")."""
    base = base_role(role)
    path = spec.linear_paths[base]
    return path if base == role else f"{path}.{role.rsplit('.', 1)[1]}"


def base_role(role: str) -> str:
    """The role of the Linear a factor role belongs to ("attn.q.1" -> "attn.q")."""
    return role.rsplit(".", 1)[0] if role.count(".") >= 2 else role


def norm_modules(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Role -> norm module of one decoder layer ("attn.pre", "mlp.pre", ...)."""
    return {role: get_submodule(layer, path) for role, path in spec.norm_paths.items()}


def text_config(model_or_config: Any) -> Any:
    """The decoder's config (the text part of a multimodal config)."""
    config = _config_of(model_or_config)
    if isinstance(config, dict):
        return config.get("text_config", config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fused_splits(model_or_config: Any) -> dict[str, dict[str, int]]:
    """Row counts of the parts of fused Linears: {"attn.qkv": {"attn.q": n, ...}, ...}.

    Phi-3 stacks q, k, v (and gate, up) along the output dimension in this order.
    """
    config = text_config(model_or_config)
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or _get(config, "hidden_size") // heads
    inter = _get(config, "intermediate_size")
    return {
        "attn.qkv": {"attn.q": heads * head_dim, "attn.k": kv_heads * head_dim, "attn.v": kv_heads * head_dim},
        "mlp.gate_up": {"mlp.gate": inter, "mlp.up": inter},
    }


def embeddings_tied(model: Any) -> bool:
    """Whether lm_head shares its weight with the input embeddings (counted once in size)."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    spec = arch_for(model)
    if spec.lm_head is None:  # an encoder: no output head
        return False
    head = get_submodule(model, spec.lm_head)
    embed = get_submodule(model, spec.embed)
    if head.weight is embed.weight:
        return True
    # meta tensors (a lazily opened model, kompakt.model.lazy) all report data_ptr 0
    return not head.weight.is_meta and head.weight.data_ptr() == embed.weight.data_ptr()
