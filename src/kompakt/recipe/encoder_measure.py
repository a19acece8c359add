"""The per-step measurement of a sentence encoder against the original (the encoder form of
`kompakt.recipe.rundata.Measurer`).

On the run's held-out sentences (RunData.eval_sentences: data.evaluation, else the held-out
end of the run's data, else the shipped held-out set `kompakt eval` uses; at most
EVAL_SENTENCES): the mean,
minimum and 5th-percentile cosine between the step's and the original's embeddings of the same
sentence, the recall@10 of the original's nearest neighbours, and the Spearman correlation of
pairwise similarities (kompakt.evaluate.embedding_fidelity). The original's embeddings are
computed once and cached in `reference_dir`, so every step and attempt embeds only itself.

With `speed` in the recipe's metrics: sentences/s at batch 32 on the first SPEED_SENTENCES
held-out sentences (best of two timed passes after a warm-up, the threads torch uses), and
the ratio to the original's, measured in the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kompakt.evaluate.embedding_fidelity import EmbeddingFidelity
from kompakt.model.loaded import LoadedModel
from kompakt.rundir.hashing import digest

SPEED_SENTENCES = 256
SPEED_BATCH = 32


def sentences_per_s(loaded: LoadedModel, sentences: list[str], batch_size: int = SPEED_BATCH) -> float:
    """Sentences/s of embed() on `sentences` (best of two passes after a warm-up pass; kompakt.evaluate.sentence_speed)."""
    from kompakt.evaluate.sentence_speed import best_rate
    from kompakt.model.encode import embed

    return best_rate(lambda: embed(loaded, sentences, batch_size=batch_size), len(sentences), repeats=2)


def fidelity_metrics(fidelity: EmbeddingFidelity, where: str) -> dict[str, Any]:
    """`fidelity` under the names a step's metrics use (recall@10, the text scored on)."""
    return {"cosine_mean": fidelity.cosine_mean, "cosine_min": fidelity.cosine_min, "cosine_p05": fidelity.cosine_p05,
            "recall_at_10": fidelity.recall_at_k, "spearman": fidelity.spearman, "eval_sentences": fidelity.sentences,
            "eval_text": where}  # fmt: skip


class EncoderMeasurer:
    """Embedding fidelity (and speed) of a step's encoder vs the original, reference cached."""

    def __init__(self, original: LoadedModel, data: Any, metrics: list[str], reference_dir: Path | None = None) -> None:
        self.original = original
        self.data = data
        self.metrics = metrics
        self.reference_dir = reference_dir
        self._reference: torch.Tensor | None = None
        self._reference_speed: float | None = None

    def reference(self) -> torch.Tensor:
        """The original's embeddings of the held-out sentences [n, d] (computed once, cached)."""
        from safetensors.torch import load_file, save_file

        from kompakt.atomic import atomic_file
        from kompakt.model.encode import embed

        if self._reference is not None:
            return self._reference
        sentences, where = self.data.eval_sentences()
        key = digest({"model": self.original.fingerprint(), "sentences": sentences, "kind": "embeddings"})
        path = None if self.reference_dir is None else self.reference_dir / f"{key}.safetensors"
        if path is not None and path.is_file():
            self._reference = load_file(str(path))["embeddings"]
        else:
            self._reference = embed(self.original, sentences)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(path) as temporary:
                    save_file({"embeddings": self._reference.contiguous()}, str(temporary))
        return self._reference

    def baseline(self) -> dict[str, Any]:
        """The original's size (and speed when asked): row 0 of the trajectory."""
        from kompakt.evaluate import disk_bytes

        row: dict[str, Any] = {"parameters": self.original.num_parameters(), "bytes": disk_bytes(self.original.path)}
        metrics: dict[str, Any] = {}
        if "speed" in self.metrics:
            self._reference_speed = sentences_per_s(self.original, self.data.eval_sentences()[0][:SPEED_SENTENCES])
            metrics["sentences_per_s"] = self._reference_speed
        row["metrics"] = metrics
        return row

    def measure(self, candidate: LoadedModel) -> dict[str, Any]:
        from kompakt.evaluate.embedding_fidelity import embedding_fidelity
        from kompakt.model.encode import embed

        sentences, where = self.data.eval_sentences()
        out = fidelity_metrics(embedding_fidelity(embed(candidate, sentences), self.reference(), k=10), where)
        if "speed" in self.metrics:
            speed = sentences_per_s(candidate, sentences[:SPEED_SENTENCES])
            out["sentences_per_s"] = speed
            if self._reference_speed:
                out["speedup"] = speed / self._reference_speed
        return out
