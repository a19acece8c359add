"""Fixtures of the model tests: a tiny model written as a GGUF file (llama.cpp layout), so
GGUF conversion tests take seconds instead of converting a real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kompakt.model.loaded import LoadedModel
from kompakt.model.tiny import CHATML_TEMPLATE, tiny_model

# HF name inside a decoder layer -> llama.cpp tensor name (blk.N.<name>.weight).
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rope; transformers undoes this on load.
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0, chat_template: str | None = None) -> LoadedModel:
    """A tiny llama as an all-F32 GGUF at `path`; returns the in-memory model it came from."""
    import gguf

    loaded = tiny_model("llama", seed=seed)
    config = loaded.model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(0)  # all F32
    _add_tokenizer(writer, loaded, config.vocab_size, chat_template)
    state = {name: tensor.detach().float().numpy() for name, tensor in loaded.model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for index in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            weight = state[f"model.layers.{index}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{index}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return loaded


def _add_tokenizer(writer, loaded: LoadedModel, vocab_size: int, chat_template: str | None) -> None:
    import gguf

    vocab = loaded.tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(loaded.tokenizer.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    types = [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens]
    tokens.append("he")  # one merge ("h e") and its token: readers reject an empty merge list
    types.append(gguf.TokenType.NORMAL)
    while len(tokens) < vocab_size:  # the tiny model pads its vocabulary to a multiple of 16
        tokens.append(f"<unused{len(tokens)}>")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(loaded.tokenizer.bos_token_id)
    writer.add_eos_token_id(loaded.tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path, the in-memory model it was written from); read-only: tests copy before corrupting."""
    path = tmp_path_factory.mktemp("session-gguf") / "tiny.gguf"
    original = write_tiny_llama_gguf(path, chat_template=CHATML_TEMPLATE)
    return path, original


@pytest.fixture
def write_tiny_gguf():
    """write_tiny_llama_gguf(path, seed=0, chat_template=None) -> LoadedModel."""
    return write_tiny_llama_gguf
