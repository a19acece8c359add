"""Skip cost of a sentence encoder's layers: how far the sentence embedding moves without layer i.

The encoder analogue of the skip KL (kompakt.scoring.skip): an encoder has no next-token
distribution, its output is one pooled embedding per sentence, compared by cosine. Layer i is
replaced by the identity (its output is its input; the residual stream passes by), the
sentences are embedded as in use (the model's pooling and normalisation,
kompakt.model.sentence.pool, over real tokens only), and the cost is

    cost_i = 1 - mean over sentences of cos(e(s), e_{-i}(s))

(0: skipping the layer changes nothing). Measured, not estimated: one forward of the full model
and one per layer for every calibration batch. The lowest-cost layers are the ones prune.depth's
`method: cosine` removes, ranked by kompakt.scoring.layers.rank_layers like the decoder scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kompakt.model.inputs import SentenceBatch, model_inputs
from kompakt.model.sentence import Pooling, pool


@contextmanager
def identity_layer(layer: nn.Module) -> Iterator[None]:
    """While inside, `layer` returns its input hidden states (in its usual output structure)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        states = args[0] if args else kwargs["hidden_states"]
        return (states, *output[1:]) if isinstance(output, tuple) else states

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _embeddings(model: nn.Module, batch: SentenceBatch, pooling: Pooling) -> torch.Tensor:
    hidden = model(**model_inputs(batch)).last_hidden_state
    return pool(hidden, batch.attention_mask, pooling)


@torch.inference_mode()
def skip_cosine_costs(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[SentenceBatch], pooling: Pooling
) -> list[float]:
    """1 - mean cos(embedding, embedding with layer i skipped) over the sentences, for every layer i."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    for batch in batches:
        if not isinstance(batch, SentenceBatch):
            raise TypeError("skip_cosine_costs scores padded sentences (a SentenceBatch), not token blocks")
        reference = _embeddings(model, batch, pooling)
        for index, layer in enumerate(layers):
            with identity_layer(layer):
                skipped = _embeddings(model, batch, pooling)
            sums[index] += float(torch.nn.functional.cosine_similarity(reference, skipped, dim=-1).double().sum())
        count += len(batch)
    return (1.0 - sums / max(1, count)).tolist()
