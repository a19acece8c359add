"""The llama.cpp backend: a .gguf file run by llama-cpp-python (`pip install kompakt[llamacpp]`).

Chat prompts are rendered with the chat template stored in the GGUF metadata (the same
Jinja2 renderer llama-cpp-python's own chat handler uses). Generation uses Llama.generate,
one token per step, so stop strings, token counts and client disconnects are handled exactly
as on the transformers backend. Prompt log-probabilities (/v1/completions echo + logprobs)
need llama.cpp to keep the logits of every position (logits_all), which costs
n_ctx x vocab floats; it is switched on when that fits in LOGITS_ALL_BUDGET.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kompakt.errors import ConfigError, ModelFormatError
from kompakt.serve.backend import SCORE_CHUNK_TOKENS, Chunk, Messages, Sampling, TokenScores, check_sampling
from kompakt.serve.stop_strings import StopStrings

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096
LOGITS_ALL_BUDGET = 1 << 30  # bytes of float32 logits kept for prompt scoring


def _gguf_field(path: Path, key: str):
    """One metadata value from a GGUF header (gguf package, memory-mapped: cheap)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = reader.get_field(key)
    if found is None:
        return None
    if key == "tokenizer.ggml.tokens":
        return len(found.data)
    return found.contents()


class LlamaCppBackend:
    """A GGUF model on llama.cpp. Args: path to the .gguf; n_ctx (default: the model's, at most 4096)."""

    kind = "llamacpp"
    task = "generate"

    def __init__(self, path: Path, *, n_ctx: int | None = None, n_threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ConfigError(
                "the llamacpp backend needs llama-cpp-python: pip install 'kompakt[llamacpp]' "
                "(or serve with --backend transformers)"
            ) from None
        arch = _gguf_field(path, "general.architecture")
        trained = _gguf_field(path, f"{arch}.context_length") or DEFAULT_N_CTX
        self.context_length = int(n_ctx or min(int(trained), DEFAULT_N_CTX))
        vocab = int(_gguf_field(path, "tokenizer.ggml.tokens") or 0)
        logits_all = self.context_length * vocab * 4 <= LOGITS_ALL_BUDGET
        try:
            self.llm = Llama(
                model_path=str(path), n_ctx=self.context_length, logits_all=logits_all, verbose=False,
                n_threads=n_threads or max(1, (os.cpu_count() or 2)), seed=0,
            )  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(
                f"llama.cpp cannot load {path} ({exc}); check the file or use --backend transformers"
            ) from None
        self.logits_all = logits_all
        self.model_id = path.stem
        self.vocab_size = int(self.llm.n_vocab())
        self._template = self.llm.metadata.get("tokenizer.chat_template")
        self.has_chat_template = bool(self._template)
        self._eog = {self.llm.token_eos()}

    # -- prompts -----------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if not ids:
            raise ConfigError("the prompt is empty; give some text to continue")
        return ids

    def encode_chat(self, messages: Messages) -> list[int]:
        if not messages:
            raise ConfigError("no messages to answer; pass at least one {'role', 'content'} message")
        if not self._template:
            lines = [f"{message['role']}: {message['content']}" for message in messages]
            return self.encode_text("\n".join(lines) + "\nassistant:")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token_id: int) -> str:
            return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

        formatter = Jinja2ChatFormatter(
            template=self._template,
            eos_token=token_text(self.llm.token_eos()),
            bos_token=token_text(self.llm.token_bos()),
        )
        try:
            prompt = formatter(messages=[dict(message) for message in messages]).prompt
        except Exception as exc:  # a template's raise_exception (e.g. roles must alternate)
            raise ConfigError(f"the chat template rejected the messages: {exc}") from None
        # The template writes BOS itself where it wants one (llama-cpp-python does the same).
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    # -- generation ----------------------------------------------------------------------
    def _is_end(self, token: int) -> bool:
        import llama_cpp

        return token in self._eog or bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Chunk]:
        check_sampling(sampling.max_tokens, sampling.temperature, sampling.top_p)
        room = self.context_length - len(ids)
        if room < 1:
            raise ConfigError(f"the prompt is {len(ids)} tokens but the context holds {self.context_length}")
        limit = min(sampling.max_tokens, room)
        self.llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = StopStrings(sampling.stop)
        # OpenAI semantics: only temperature and top_p shape the distribution.
        tokens = self.llm.generate(
            ids, temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0, typical_p=1.0,
            repeat_penalty=1.0, logits_processor=_bias_processor(sampling.logit_bias),
        )  # fmt: skip
        produced = 0
        try:
            for token in tokens:
                if self._is_end(token):
                    break
                produced += 1
                text, hit = stopper.feed(decoder.decode(self.llm.detokenize([token])))
                if hit:
                    yield Chunk(text, token, "stop")
                    return
                yield Chunk(text, token)
                if produced >= limit:
                    break
        finally:
            tokens.close()
        text, hit = stopper.feed(decoder.decode(b"", final=True))
        tail = text if hit else text + stopper.flush()
        yield Chunk(tail, None, "length" if produced >= limit and not hit else "stop")

    def score(self, ids: list[int], top_n: int) -> TokenScores:
        """log p(ids[i] | ids[:i]) and the top_n alternatives, SCORE_CHUNK_TOKENS rows at a time
        (llama.cpp keeps n x vocab float32 logits; a float64 copy of all of them would double that)."""
        if not self.logits_all:
            raise ConfigError(
                "prompt logprobs need llama.cpp's logits for every position, too large for this "
                "model's context x vocabulary; serve it with --backend transformers to score"
            )
        self.llm.reset()
        self.llm.eval(ids)
        chosen: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        for start in range(0, len(ids) - 1, SCORE_CHUNK_TOKENS):
            end = min(start + SCORE_CHUNK_TOKENS, len(ids) - 1)
            logits = np.asarray(self.llm.scores[start:end], dtype=np.float64)  # [end - start, vocab]
            logprobs = logits - _logsumexp(logits)
            for row, target in zip(logprobs, ids[start + 1 : end + 1]):
                chosen.append(float(row[target]))
                best = np.argsort(row)[::-1][: max(top_n, 1)]
                top.append({self.decode([int(i)]): float(row[i]) for i in best})
        pieces = [self.llm.detokenize([token]).decode("utf-8", errors="replace") for token in ids]
        self.llm.reset()  # the next generate must not trust this partial state as a cached prompt
        return TokenScores(pieces, chosen, top)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


def _bias_processor(logit_bias: dict[int, float]):
    """OpenAI logit_bias as a llama-cpp-python logits processor (None: no bias)."""
    if not logit_bias:
        return None
    from llama_cpp import LogitsProcessorList

    tokens = np.fromiter(logit_bias.keys(), dtype=np.int64)
    values = np.fromiter(logit_bias.values(), dtype=np.float32)

    def add_bias(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores[tokens] += values
        return scores

    return LogitsProcessorList([add_bias])


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))
