"""Which transformers families llama.cpp runs, and the GGUF hyperparameters of each.

Architecture knowledge is data: `GGUF_FAMILIES` maps a transformers `model_type` to the
llama.cpp architecture and the three conversions llama.cpp expects (as its own
convert_hf_to_gguf.py does):

- `permute_qk`: Llama and Mistral store q/k rows in the HF rotary layout (rotate-half);
  llama.cpp's rope pairs interleaved dimensions, so the rows of each head are permuted.
  Qwen2/3, Phi-3 and Gemma use llama.cpp's NEOX rope, which matches HF: no permutation.
- `norm_shift`: Gemma RMSNorms compute x * (1 + w); llama.cpp computes x * w, so 1 is added
  to every norm weight.
- `tied_output`: whether llama.cpp reads the output projection from token_embd when the
  file has no output.weight (all but Qwen2-MoE, whose tied head is written as output.weight).

Encoder rows (`encoder=True`, sentence-embedding models) map onto llama.cpp's "bert"
architecture; what differs between them is data too: `position_offset` (RoBERTa / XLM-R count
positions from padding_idx + 1, llama.cpp from 0, so the first rows are dropped), `ffn_key`
(DistilBERT names the FFN width hidden_dim), `skip` (BERT's pooler, which sentence-embedding
pooling never uses), `token_types` (a token-type table) and `bias_free` (config flags that must be
off: llama.cpp's modern-bert graph has no biases). ModernBERT is llama.cpp's "modern-bert" (rope,
alternating global / local attention: `sliding_window`). Their header and checks are in
kompakt.export.gguf_encoder.

`check_expressible` is called before anything is written and refuses, in one line, what
llama.cpp would compute differently (unknown rope scaling, Gemma attention scales that
llama.cpp hard-codes, a vocabulary larger than the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kompakt.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class GGUFFamily:
    model_type: str
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_shift: float = 0.0
    sliding_window: bool = False  # writes attention.sliding_window (+ the per-layer pattern)
    softcapping: bool = False  # Gemma 2 attention/final logit soft-capping
    encoder: bool = False  # a bidirectional sentence encoder (kompakt.export.gguf_encoder)
    position_offset: bool = False  # position rows start at pad_token_id + 1 (RoBERTa)
    ffn_key: str = "intermediate_size"  # the config attribute holding the FFN width
    skip: tuple[str, ...] = ()  # HF tensor name prefixes llama.cpp has no use for
    token_types: bool = True  # encoders: the tokenizer declares a token-type count (BERT's segment table)
    bias_free: tuple[str, ...] = ()  # config flags that must be false (llama.cpp has no such biases)
    moe_norm: bool | None = None  # MoE: whether llama.cpp renormalises top-k weights (kompakt.export.gguf_moe)
    tied_output: bool = True  # llama.cpp falls back to token_embd without output.weight (not qwen2moe)
    mha_only: bool = False  # llama.cpp sizes attn_k_norm n_embd: no grouped-query attention (OLMoE)


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", "LLAMA", permute_qk=True),
    "mistral": GGUFFamily("mistral", "LLAMA", permute_qk=True),
    "qwen2": GGUFFamily("qwen2", "QWEN2"),
    "qwen3": GGUFFamily("qwen3", "QWEN3"),
    "phi3": GGUFFamily("phi3", "PHI3"),
    "gemma": GGUFFamily("gemma", "GEMMA", norm_shift=1.0),
    "gemma2": GGUFFamily("gemma2", "GEMMA2", norm_shift=1.0, sliding_window=True, softcapping=True),
    "gemma3_text": GGUFFamily("gemma3_text", "GEMMA3", norm_shift=1.0, sliding_window=True),
    "mixtral": GGUFFamily("mixtral", "LLAMA", permute_qk=True, moe_norm=True),
    "qwen2_moe": GGUFFamily("qwen2_moe", "QWEN2MOE", moe_norm=False, tied_output=False),
    "qwen3_moe": GGUFFamily("qwen3_moe", "QWEN3MOE", moe_norm=True),
    "olmoe": GGUFFamily("olmoe", "OLMOE", moe_norm=False, mha_only=True),
    "bert": GGUFFamily("bert", "BERT", encoder=True, skip=("pooler.",)),
    "distilbert": GGUFFamily("distilbert", "BERT", encoder=True, ffn_key="hidden_dim"),
    "roberta": GGUFFamily("roberta", "BERT", encoder=True, position_offset=True, skip=("pooler.",)),
    "xlm-roberta": GGUFFamily("xlm-roberta", "BERT", encoder=True, position_offset=True, skip=("pooler.",)),
    "modernbert": GGUFFamily("modernbert", "MODERN_BERT", encoder=True, sliding_window=True, token_types=False,
                             bias_free=("attention_bias", "mlp_bias", "norm_bias")),  # fmt: skip
}
_ROPE_TYPES = ("default", "linear")


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_for(config: Any) -> GGUFFamily:
    """The GGUF family of a config, or a one-line UnsupportedArchitectureError."""
    model_type = getattr(config, "model_type", None)
    family = GGUF_FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"GGUF export does not support model type {model_type!r}; llama.cpp export covers "
            f"{', '.join(GGUF_FAMILIES)} (export it with --format hf instead)"
        )
    return family


def head_dim(config: Any) -> int:
    return int(_get(config, "head_dim", config.hidden_size // config.num_attention_heads))


def rope_parameters(config: Any, layer_kind: str = "full_attention") -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer kind for Gemma 3)."""
    params = _get(config, "rope_parameters", None) or {}
    if layer_kind in params and isinstance(params[layer_kind], dict):
        return params[layer_kind]
    if params and all(isinstance(v, dict) for v in params.values()):
        return next(iter(params.values()))
    legacy = _get(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", _get(config, "rope_theta", 10000.0))
    return {**legacy, **params, "rope_theta": theta}


def check_expressible(config: Any, family: GGUFFamily, n_vocab: int) -> None:
    """Refuse, before writing, what llama.cpp cannot compute the same way."""
    from kompakt.export.gguf_moe import check_moe

    check_moe(config, family)
    model_type = family.model_type
    for kind in ("full_attention", "sliding_attention"):
        rope = rope_parameters(config, kind)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"{model_type} with rope scaling {rope_type!r} cannot be exported to GGUF by kompakt "
                f"(supported: {', '.join(_ROPE_TYPES)}); export with --format hf and convert with llama.cpp"
            )
    if family.norm_shift and family.model_type != "gemma":
        scalar = _get(config, "query_pre_attn_scalar", head_dim(config))
        if int(scalar) != head_dim(config):
            raise UnsupportedArchitectureError(
                f"{model_type} with query_pre_attn_scalar {scalar} != head_dim {head_dim(config)}: "
                "llama.cpp scales attention by 1/sqrt(head_dim), so the GGUF would compute differently"
            )
    if n_vocab > config.vocab_size:
        raise UnsupportedArchitectureError(
            f"the tokenizer has {n_vocab} tokens but the embedding only {config.vocab_size} rows; "
            "llama.cpp needs one row per token (resize the embeddings first)"
        )
    kv_heads = _get(config, "num_key_value_heads", config.num_attention_heads)
    if family.mha_only and kv_heads != config.num_attention_heads:
        raise UnsupportedArchitectureError(
            f"{model_type} with {kv_heads} KV heads for {config.num_attention_heads} query heads: llama.cpp's "
            f"{family.arch.lower()} graph normalises k over all heads (no grouped-query attention); export with --format hf"
        )
    if _get(config, "attention_bias", False) and family.arch == "LLAMA":
        raise UnsupportedArchitectureError(
            f"{model_type} with attention biases is not expressible in llama.cpp's llama architecture"
        )


def _layer_types(config: Any) -> list[str] | None:
    types = _get(config, "layer_types", None)
    return list(types) if types else None


def add_hyperparameters(writer: Any, config: Any, family: GGUFFamily) -> None:
    """Write the `<arch>.*` keys llama.cpp reads for this family."""
    n_layers = int(config.num_hidden_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(_get(config, "num_key_value_heads", config.num_attention_heads)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    dim = head_dim(config)
    # llama.cpp derives head_dim = n_embd / n_head unless told; pruned heads break that.
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    partial = float(_get(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(dim * partial))
    rope = rope_parameters(config, "full_attention")
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    from kompakt.export.gguf_moe import add_moe_hyperparameters

    add_moe_hyperparameters(writer, config)
    if family.sliding_window:
        _add_sliding_window(writer, config)
    if family.softcapping:
        if _get(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if _get(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _add_sliding_window(writer: Any, config: Any) -> None:
    window = _get(config, "sliding_window", None)
    types = _layer_types(config)
    if not window or (types is not None and "sliding_attention" not in types):
        return
    writer.add_sliding_window(int(window))
    if types is not None:
        # Per-layer pattern, so a pruned model (dropped layers) keeps its own layer kinds.
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
    local = rope_parameters(config, "sliding_attention")
    if "rope_theta" in local:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
