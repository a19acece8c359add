"""Text generation: a token loop with a KV cache that streams decoded text as it is made.

One clean function of (model, input, sampling parameters), so the terminal chat and the
OpenAI-compatible server share it. A hand-written loop rather than `model.generate` in a
thread: no thread to leak when the consumer stops early (a closed generator just stops),
sampling is exactly the parameters given (the model's generation_config defaults such as
repetition_penalty or top_k do not sneak in), and stop strings are cut precisely.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch

from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel
from kompakt.serve.backend import Chunk, Messages, check_sampling
from kompakt.serve.stop_strings import StopStrings

logger = logging.getLogger(__name__)

# Special tokens that end an assistant turn in common chat formats. A converted checkpoint
# (e.g. from GGUF) may name only <|endoftext|> as EOS while its template ends turns with
# <|im_end|>; stopping at whichever of these the tokenizer knows as special avoids run-ons.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer, messages: Messages) -> tuple[str, bool]:
    """Messages as prompt text; returns (text, includes_special_tokens).

    With a chat template the rendering carries its own BOS/turn tokens; without one (base
    models such as Gemma 3 270M) it falls back to plain "role: content" lines.
    """
    if not messages:
        raise ConfigError("no messages to answer; pass at least one {'role', 'content'} message")
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [dict(message) for message in messages], add_generation_prompt=True, tokenize=False
        )
        return text, True
    logger.warning("tokenizer has no chat template; rendering messages as plain 'role: content' text")
    lines = [f"{message['role']}: {message['content']}" for message in messages]
    return "\n".join(lines) + "\nassistant:", False


def encode_input(loaded: LoadedModel, prompt_or_messages: str | Messages) -> list[int]:
    """Token ids of a plain prompt (tokenizer's default special tokens, e.g. Gemma's <bos>)
    or of chat messages rendered with the chat template."""
    tokenizer = loaded.tokenizer
    if isinstance(prompt_or_messages, str):
        text, templated = prompt_or_messages, False
    else:
        text, templated = render_messages(tokenizer, prompt_or_messages)
    # A chat template already wrote BOS where it belongs; adding it again would double it.
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if not ids:
        raise ConfigError("the prompt is empty; give some text to continue")
    return list(ids)


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """Ids that end generation: the tokenizer's and generation_config's EOS (int or list)
    plus known end-of-turn tokens the tokenizer treats as special."""
    tokenizer, model = loaded.tokenizer, loaded.model
    found: set[int] = set()
    candidates = [tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for value in candidates:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(item) for item in value)
    special = set(getattr(tokenizer, "all_special_tokens", ())) | _added_special(tokenizer)
    for token in END_OF_TURN_TOKENS:
        if token in special:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                found.add(token_id)
    return found


def _added_special(tokenizer) -> set[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {str(token) for token in decoder.values() if getattr(token, "special", False)}


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces whose concatenation is the full decode.

    Decodes a short window (from the start of the last emitted piece) twice and emits the
    difference, holding text back while it ends in U+FFFD: a multi-byte character split
    over byte tokens is only emitted once complete. Sentencepiece-style leading-space
    handling stays right because the window always starts at an already-emitted boundary.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Greedy at temperature 0, else nucleus sampling. logits: [vocab] on the CPU in fp32."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the token crossing it included).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def cache_names(model) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache: transformers renamed
    past_key_values to cache in 5.x; older versions only know the former."""
    if "cache" in inspect.signature(model.forward).parameters:
        return "cache", "cache"
    return "past_key_values", "past_key_values"


def _bias_vector(logit_bias: Mapping[int, float] | None, vocab: int) -> torch.Tensor | None:
    """OpenAI logit_bias as a [vocab] tensor added to every step's logits (None: no bias)."""
    if not logit_bias:
        return None
    bias = torch.zeros(vocab)
    for token, value in logit_bias.items():
        bias[int(token)] = float(value)
    return bias


def stream_token_ids(
    loaded: LoadedModel,
    input_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> Iterator[int]:
    """Sampled token ids, one per step, until a stop token (not yielded) or max_new_tokens."""
    check_sampling(max_new_tokens, temperature, top_p)
    model, stops = loaded.model, stop_token_ids(loaded)
    room = loaded.context_length - len(input_ids)
    if room < 1:
        raise ConfigError(
            f"the prompt is {len(input_ids)} tokens but {loaded.name} holds {loaded.context_length}; "
            "shorten it (in chat: /reset)"
        )
    generator = torch.Generator()  # CPU: same samples for a seed on any device
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cache_kwarg, cache_attr = cache_names(model)
    step_ids = torch.tensor([list(input_ids)], dtype=torch.long, device=loaded.device)
    cache, bias = None, None
    for _ in range(min(max_new_tokens, room)):
        with torch.inference_mode():
            kwargs = {cache_kwarg: cache} if cache is not None else {}
            out = model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **kwargs)
        cache = getattr(out, cache_attr, None)
        logits = out.logits[0, -1].float().cpu()
        if logit_bias:
            bias = bias if bias is not None else _bias_vector(logit_bias, logits.shape[-1])
            logits = logits + bias
        token = _next_token(logits, temperature, top_p, generator)
        if token in stops:
            return
        yield token
        step_ids = torch.tensor([[token]], dtype=torch.long, device=loaded.device)


def chunks_from_ids(
    loaded: LoadedModel,
    input_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> Iterator[Chunk]:
    """Generation from token ids as text chunks with a closing chunk carrying finish_reason
    (what the server needs: prompts may arrive tokenized, usage counts tokens)."""
    decoder, stopper = IncrementalDecoder(loaded.tokenizer), StopStrings(stop)
    limit = min(max_new_tokens, loaded.context_length - len(input_ids))
    produced = 0
    tokens = stream_token_ids(
        loaded, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        logit_bias=logit_bias,
    )  # fmt: skip
    try:
        for token in tokens:
            produced += 1
            text, hit = stopper.feed(decoder.add(token))
            if hit:
                yield Chunk(text, token, "stop")
                return
            yield Chunk(text, token)
    finally:
        tokens.close()  # a consumer that stops early stops the token loop with it
    text, hit = stopper.feed(decoder.flush())
    tail = text if hit else text + stopper.flush()
    yield Chunk(tail, None, "length" if produced >= limit and not hit else "stop")


def stream_chunks(
    loaded: LoadedModel,
    prompt_or_messages: str | Messages,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
) -> Iterator[Chunk]:
    """Like `stream_generate`, with token ids and a closing chunk carrying finish_reason
    (what an OpenAI-style server needs for streaming deltas and usage counts)."""
    yield from chunks_from_ids(
        loaded, encode_input(loaded, prompt_or_messages), max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, stop=stop,
    )  # fmt: skip


def stream_generate(
    loaded: LoadedModel,
    prompt_or_messages: str | Messages,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces as the model generates them.

    Args:
        loaded: the model and tokenizer.
        prompt_or_messages: a plain prompt (tokenized as is, with the tokenizer's default
            special tokens) or chat messages [{"role", "content"}, ...] rendered with the
            chat template and a generation prompt (plain "role: content" text when the
            tokenizer has none).
        max_new_tokens: at most this many tokens are generated (fewer if the context ends).
        temperature: 0 = greedy; higher = more random.
        top_p: nucleus sampling mass (ignored when greedy).
        seed: makes sampling reproducible; None = fresh randomness.
        stop: string(s) that end the generation; not included in the output.
    """
    for chunk in stream_chunks(
        loaded,
        prompt_or_messages,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    ):
        if chunk.text:
            yield chunk.text


def generate_text(loaded: LoadedModel, prompt_or_messages: str | Messages, **sampling) -> str:
    """The whole generated text at once; same arguments as `stream_generate`."""
    return "".join(stream_generate(loaded, prompt_or_messages, **sampling))
