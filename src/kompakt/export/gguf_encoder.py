"""Sentence encoders (BERT, DistilBERT, RoBERTa, XLM-R, ModernBERT) as llama.cpp GGUF files.

llama.cpp runs a BERT-family encoder as an embedding model (`llama-embedding`, `llama-server
--embeddings`, llama-cpp-python `Llama(path, embedding=True)`): word + position (+ token type 0)
embeddings, LayerNorm, post-norm layers with biased q/k/v/o and a GELU FFN, then the pooling
written in `bert.pooling_type`. What it needs beyond the decoder header (convert_hf_to_gguf.py's
BertModel is the reference): `attention.causal = false`, `attention.layer_norm_epsilon`, the
pooling type, `tokenizer.ggml.token_type_count`, and F32 position / token-type tables (llama.cpp
adds the token-type row to F32 activations with a kernel that takes F32 only).

Pooling follows the model's sentence-transformers files (LoadedModel.pooling): mean -> MEAN, cls
-> CLS, lasttoken -> LAST. llama.cpp has no max pooling: refused. llama.cpp does not L2-normalise
pooled embeddings unless asked (llama-cpp-python `embed(normalize=True)`, llama-server's
`embd_normalize`, default on), so a model whose sentence-transformers pipeline ends in Normalize
gets the same direction, and cosine similarity is unchanged; its length is normalised by the caller.

What llama.cpp would compute differently is refused before anything is written, in one line: an
activation other than GELU, relative position embeddings, a decoder-style config, max pooling.
DistilBERT has no token-type table; llama.cpp's bert graph skips the token-type add when the
tensor is absent, which is exactly DistilBERT.

ModernBERT is llama.cpp's "modern-bert": rope on q/k (the global layers' theta as
`rope.freq_base`, the local layers' as `rope.freq_base_swa`), local attention over
`local_attention` positions (`attention.sliding_window`) on the layers `layer_types` marks
"sliding_attention" (written per layer, so a depth-pruned model keeps its own pattern), GeGLU
FFN, bias-free LayerNorms. Verified against transformers token by token on a tiny ModernBERT
with sharpened attention, where a wrong window, theta or layer pattern moves the states visibly.
"""

from __future__ import annotations

from typing import Any

from kompakt.errors import UnsupportedArchitectureError
from kompakt.export.gguf_arch import GGUFFamily, head_dim, rope_parameters

# llama.cpp's bert graph applies ggml_gelu (tanh approximation, within 1e-3 of erf GELU).
GELU = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
POOLING = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}  # gguf.PoolingType members
F32_TENSORS = ("position_embd.weight", "token_types.weight")


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def position_offset(config: Any, family: GGUFFamily) -> int:
    """Rows of the position table before position 0 (RoBERTa: pad_token_id + 1), 0 for BERT."""
    return int(config.pad_token_id) + 1 if family.position_offset else 0


def check_encoder(config: Any, family: GGUFFamily, pooling: Any) -> None:
    """Refuse, before writing, an encoder llama.cpp would run differently (module docstring)."""
    model_type = family.model_type
    if pooling is None:
        raise UnsupportedArchitectureError(
            f"{model_type} is an encoder but the model has no sentence pooling; load it with kompakt.load "
            "(which reads the sentence-transformers files) before exporting it to GGUF"
        )
    if pooling.mode not in POOLING:
        raise UnsupportedArchitectureError(
            f"llama.cpp has no {pooling.mode} pooling (it pools {', '.join(POOLING)}); "
            "export this encoder with --format onnx or hf instead"
        )
    activation = _get(config, "hidden_act", _get(config, "activation", _get(config, "hidden_activation", "gelu")))
    if activation not in GELU:
        raise UnsupportedArchitectureError(
            f"{model_type} with activation {activation!r}: llama.cpp's bert graph applies GELU; "
            "export it with --format onnx or hf instead"
        )
    position = _get(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise UnsupportedArchitectureError(
            f"{model_type} with {position!r} position embeddings: llama.cpp's bert graph adds absolute "
            "positions only; export it with --format onnx or hf instead"
        )
    if _get(config, "is_decoder", False) or _get(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError(f"{model_type} configured as a decoder cannot run as a llama.cpp encoder")
    biased = [flag for flag in family.bias_free if _get(config, flag, False)]
    if biased:
        raise UnsupportedArchitectureError(
            f"{model_type} with {', '.join(biased)}: llama.cpp's {family.arch.lower().replace('_', '-')} graph has "
            "no such biases; export it with --format onnx or hf instead"
        )
    if family.position_offset and _get(config, "pad_token_id", None) is None:
        raise UnsupportedArchitectureError(
            f"{model_type} without pad_token_id: its position offset is unknown; set pad_token_id in config.json"
        )


def add_encoder_hyperparameters(writer: Any, config: Any, family: GGUFFamily, pooling: Any) -> None:
    """Write the `bert.*` keys and the token-type count llama.cpp reads for an encoder."""
    import gguf

    heads = int(config.num_attention_heads)
    writer.add_context_length(int(config.max_position_embeddings) - position_offset(config, family))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(getattr(config, family.ffn_key)))
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    # llama.cpp derives head_dim = n_embd / n_head unless told; pruned heads break that.
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    # DistilBERT's LayerNorms use 1e-12, fixed; ModernBERT names it norm_eps.
    writer.add_layer_norm_eps(float(_get(config, "layer_norm_eps", _get(config, "norm_eps", 1e-12))))
    writer.add_causal_attention(False)
    writer.add_pooling_type(getattr(gguf.PoolingType, POOLING[pooling.mode]))
    if family.token_types:
        writer.add_token_type_count(int(_get(config, "type_vocab_size", 1)))
    if family.sliding_window:
        _add_local_attention(writer, config)


def _add_local_attention(writer: Any, config: Any) -> None:
    """ModernBERT's rope and global / local layers (module docstring)."""
    import gguf

    writer.add_rope_freq_base(float(rope_parameters(config, "full_attention").get("rope_theta", 160000.0)))
    local = rope_parameters(config, "sliding_attention")
    params = _get(config, "rope_parameters", None) or {}
    theta = local.get("rope_theta") if "sliding_attention" in params else _get(config, "local_rope_theta", 10000.0)
    writer.add_rope_freq_base_swa(float(theta))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_sliding_window(int(config.local_attention))
    types = _get(config, "layer_types", None)
    if not types:  # older configs: every n-th layer (from the first) is global
        every = int(config.global_attn_every_n_layers)
        types = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
