"""Tiny random models of every supported family, built in code (tests, docs, examples).

No downloads: the tokenizer is a byte-level tokenizer made here (256 byte tokens plus a few
special tokens, ChatML chat template), so any text round-trips and chat data renders.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from kompakt.model.loaded import LoadedModel
from kompakt.model.progress import quiet_third_party

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "gemma3")
# Mixture-of-Experts families: their own tuple, so tests written for the dense layout keep to
# TINY_FAMILIES; the pass contract and the MoE tests run both.
TINY_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 272  # 256 bytes + 5 specials, padded to a multiple of 16
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small but structurally complete: GQA (4 query heads, 2 KV heads), head_dim 16, 4 layers.
_BASE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
_FAMILY_OVERRIDES: dict[str, dict] = {
    "gemma": dict(tie_word_embeddings=True),
    "gemma2": dict(tie_word_embeddings=True, sliding_window=64, query_pre_attn_scalar=16),
    "gemma3_text": dict(tie_word_embeddings=True, sliding_window=64, query_pre_attn_scalar=16),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=True),
    "phi3": dict(original_max_position_embeddings=512),
}
# Mixture of Experts: 4 experts of width 32, top-2, 2 layers (the experts' width key differs by
# family). Qwen2-MoE adds its gated shared expert; Qwen3-MoE / OLMoE keep top-k unrenormalised
# as their real configs do, Qwen2-MoE renormalises (both branches get exercised).
_MOE = dict(num_hidden_layers=2, num_experts_per_tok=2, router_aux_loss_coef=0.0)
_FAMILY_OVERRIDES.update({
    "mixtral": dict(_MOE, num_local_experts=4, intermediate_size=32),
    "qwen2_moe": dict(_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      norm_topk_prob=True, tie_word_embeddings=True),
    "qwen3_moe": dict(_MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=False),
    "olmoe": dict(_MOE, num_experts=4, intermediate_size=32, norm_topk_prob=False),
})  # fmt: skip

# Multimodal families: the tiny text model of a text family inside the smallest vision wrapper
# transformers builds (one SigLIP layer, a 28x28 image of 2x2 patches pooled to 4 tokens), so
# the decoder sits where the real checkpoints keep it (Gemma 3: model.language_model).
_WRAPPED: dict[str, tuple[str, dict]] = {
    "gemma3": ("gemma3_text", dict(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_id=269, eoi_token_id=270, image_token_id=271,
    )),
}  # fmt: skip


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte one token) with BOS/EOS/PAD and a ChatML template."""
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort()
    vocab = {char: index for index, char in enumerate(SPECIAL_TOKENS)}
    for char in byte_chars:
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=_BASE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(family: str, **overrides):
    """The config of a tiny model of `family` (a transformers model_type)."""
    if family not in TINY_FAMILIES + TINY_MOE:
        raise ValueError(f"no tiny model for {family!r}; choose one of {', '.join(TINY_FAMILIES + TINY_MOE)}")
    if family in _WRAPPED:  # `overrides` size the decoder, as for the text family
        text_family, wrapper = _WRAPPED[family]
        text = tiny_config(text_family, **overrides)
        return AutoConfig.for_model(
            family, text_config=text.to_dict(), tie_word_embeddings=text.tie_word_embeddings, **wrapper
        )
    kwargs = {**_BASE, **_FAMILY_OVERRIDES.get(family, {}), **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    """A randomly initialised tiny model of `family`, in fp32 eval mode, with its tokenizer."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny(family: str, directory, seed: int = 0) -> LoadedModel:
    """Build a tiny model and save it as a Hugging Face directory (safetensors + tokenizer)."""
    loaded = tiny_model(family, seed=seed)
    with quiet_third_party():
        loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return loaded


# Tiny sentence encoders live in their own file; re-exported so tests find every tiny model here.
from kompakt.model.tiny_encoder import TINY_ENCODERS, save_tiny_encoder, tiny_encoder  # noqa: E402,F401
