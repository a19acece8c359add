"""The transformers backend: any model kompakt loads (kompakt.model.load), on kompakt's token loop."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel
from kompakt.serve.backend import SCORE_CHUNK_TOKENS, Chunk, Messages, Sampling, TokenScores, check_sampling
from kompakt.serve.generate import cache_names, chunks_from_ids, encode_input, has_chat_template


class TransformersBackend:
    """A LoadedModel behind the Backend interface (kompakt.serve.backend)."""

    kind = "transformers"
    task = "generate"

    def __init__(self, loaded: LoadedModel, model_id: str | None = None) -> None:
        self.loaded = loaded
        self.model_id = model_id or loaded.name
        self.context_length = loaded.context_length
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.loaded.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        return encode_input(self.loaded, text)

    def encode_chat(self, messages: Messages) -> list[int]:
        from jinja2 import TemplateError

        try:
            return encode_input(self.loaded, messages)
        except (TemplateError, ValueError, TypeError, KeyError) as exc:  # e.g. "roles must alternate"
            raise ConfigError(f"the chat template rejected the messages: {exc}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Chunk]:
        check_sampling(sampling.max_tokens, sampling.temperature, sampling.top_p)
        return chunks_from_ids(
            self.loaded, ids, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed, stop=sampling.stop, logit_bias=sampling.logit_bias,
        )  # fmt: skip

    def score(self, ids: list[int], top_n: int) -> TokenScores:
        """log p(ids[i] | ids[:i]) and the top_n alternatives at each i.

        The sequence runs through the model SCORE_CHUNK_TOKENS positions at a time on a KV
        cache, so at most chunk x vocab logits exist at once (an 8k-token prompt on a 49k
        vocabulary would otherwise hold 1.6 GB of logits, and twice that after log_softmax).
        """
        model, device, tokenizer = self.loaded.model, self.loaded.device, self.loaded.tokenizer
        cache_kwarg, cache_attr = cache_names(model)
        chosen: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        cache = None
        # Chunk [start, end) predicts positions start+1 .. end (the last row of the last chunk predicts nothing).
        for start in range(0, len(ids) - 1, SCORE_CHUNK_TOKENS):
            end = min(start + SCORE_CHUNK_TOKENS, len(ids) - 1)
            with torch.inference_mode():
                kwargs = {cache_kwarg: cache} if cache is not None else {}
                out = model(input_ids=torch.tensor([ids[start:end]], device=device), use_cache=True, **kwargs)
            cache = getattr(out, cache_attr, None)
            rows = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()  # [end - start, vocab]
            targets = torch.tensor(ids[start + 1 : end + 1])
            chosen.extend(rows.gather(1, targets[:, None])[:, 0].tolist())
            values, indices = torch.topk(rows, max(top_n, 1), dim=-1)
            names = tokenizer.batch_decode(indices.reshape(-1, 1).tolist())
            width = values.shape[1]
            for row, row_values in enumerate(values.tolist()):
                top.append(dict(zip(names[row * width : (row + 1) * width], row_values)))
        return TokenScores(tokenizer.batch_decode([[token] for token in ids]), chosen, top)

    def close(self) -> None:
        pass
