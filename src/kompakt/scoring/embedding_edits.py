"""One-layer edits of a sentence encoder scored on its sentence embeddings (the analysis' measure).

The encoder analogue of skip KL (skip.py). An encoder has no next-token distribution; what a
user of a sentence-embedding model keeps or loses is the pooled embedding. So layer i is
replaced by the identity (encoder_skip.identity_layer, the hook prune.depth's score uses), every
calibration sentence is embedded (pooled and normalised as the model's sentence-transformers
files say), and the result is compared with the unedited model's embedding of the same sentence:
the mean cosine over sentences (and the worst one). `1 - cosine` is the cost: the layer with the
smallest cost is the cheapest to drop, as Minitron's "remove one layer, measure the change"
ranks decoder layers.

Where encoder_skip.skip_cosine_costs (prune.depth) streams batches and returns one number per
layer, `embedding_skip_scores` scores every layer against a reference embedded once, which the
analysis also scores quantization edits against (embedding_quant.py), and reports the worst
sentence beside the mean. Batches are padded sentences (kompakt.model.inputs.SentenceBatch);
pooling reads the mask, so padding does not change a sentence's embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kompakt.model.inputs import SentenceBatch, model_inputs, pad_sentences
from kompakt.model.sentence import pool
from kompakt.scoring.encoder_skip import identity_layer


@dataclass
class EmbeddingScore:
    """Agreement of an edited model's sentence embeddings with the reference's."""

    cosine: float  # mean over sentences
    min_cosine: float  # the worst sentence
    per_linear: dict[str, float] = field(default_factory=dict)  # role -> 1 - cosine (quantization only)

    @property
    def loss(self) -> float:
        """1 - mean cosine: 0 when nothing changed; the number layers are ranked by."""
        return 1.0 - self.cosine

    def to_dict(self) -> dict:
        out = {"cosine": self.cosine, "min_cosine": self.min_cosine, "loss": self.loss}
        if self.per_linear:
            out["per_linear"] = dict(self.per_linear)
        return out


def sentence_batches(tokenizer, sentences: Sequence[str], max_length: int, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> list[SentenceBatch]:  # fmt: skip
    """Tokenized sentences (special tokens added, cut to `max_length`), padded `batch_size` at a time."""
    ids = tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [batch.to(device) for batch in pad_sentences(ids, pad).split(batch_size)]


@torch.inference_mode()
def pooled_embeddings(model: nn.Module, batches: Sequence[SentenceBatch], pooling) -> torch.Tensor:
    """[n_sentences, hidden] fp32 embeddings of every batch, pooled per `pooling`."""
    rows = []
    for batch in batches:
        hidden = model(**model_inputs(batch)).last_hidden_state
        rows.append(pool(hidden.float(), batch.attention_mask, pooling).float())
    return torch.cat(rows)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> EmbeddingScore:
    """Cosine of each candidate row with its reference row: mean and minimum."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return EmbeddingScore(cosine=float(cos.mean()), min_cosine=float(cos.min()))


def embedding_skip_scores(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Sequence[SentenceBatch],
    pooling,
    reference: torch.Tensor,
    advance: Callable[[], None] = lambda: None,
) -> list[EmbeddingScore]:
    """Score the model with each layer skipped in turn against `reference` embeddings."""
    scores = []
    for layer in layers:
        with identity_layer(layer):
            scores.append(compare(reference, pooled_embeddings(model, batches, pooling)))
        advance()
    return scores
