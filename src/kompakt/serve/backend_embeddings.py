"""The embedding backend: an encoder LoadedModel (sentence-embedding model) behind /v1/embeddings.

    backend = EmbeddingBackend(kompakt.load("all-minilm-l6-v2"))
    ids = backend.tokenize(["a sentence"], truncate=True)
    vectors = backend.embed_ids(ids)          # [n, d] float32, pooled as the model's files say

Texts are tokenized exactly as kompakt.model.encode.embed tokenizes them (special tokens added,
cut to the model's limit: the smaller of the sentence-transformers max_seq_length and the
position limit), and pooled with the same kompakt.model.sentence.pool, so the server returns
the embeddings `embed()` computes. Every method runs on the server's one model thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kompakt.errors import ConfigError
from kompakt.model.loaded import LoadedModel
from kompakt.serve.backend import check_embedding_ids, tokenize_within


class EmbeddingBackend:
    """An encoder LoadedModel serving embeddings (no generation: task "embed")."""

    kind = "transformers"
    task = "embed"
    has_chat_template = False

    def __init__(self, loaded: LoadedModel, model_id: str | None = None) -> None:
        if not loaded.is_encoder:
            raise ConfigError(f"{loaded.name} is not an embedding model; serve it with the generation backend")
        from kompakt.model.encode import input_limit

        self.loaded = loaded
        self.model_id = model_id or loaded.name
        self.context_length = input_limit(loaded)
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])
        self.dimensions = int(loaded.model.config.hidden_size)
        self.normalize = bool(loaded.pooling.normalize)
        tokenizer = loaded.tokenizer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text with the model's special tokens, cut to context_length
        (InputTooLong for a text over it when `truncate` is False)."""
        texts = self.loaded.pooling.texts(list(texts))  # lowercased where the model's sentence config says so
        return tokenize_within(self.loaded.tokenizer, texts, self.context_length, truncate)

    def check_ids(self, ids: Sequence[int], field_name: str) -> None:
        check_embedding_ids(ids, self.vocab_size, self.context_length, field_name)

    @torch.inference_mode()
    def embed_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled embeddings [len(batch), dimensions] (float32) of token-id rows, padded together."""
        from kompakt.model.sentence import pool

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, : len(ids)] = 1
        device = self.loaded.device
        hidden = self.loaded.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return pool(hidden.float(), mask.to(device), self.loaded.pooling).float().cpu().numpy()

    def close(self) -> None:
        pass
