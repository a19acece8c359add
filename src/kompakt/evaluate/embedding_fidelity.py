"""How faithfully a student's sentence embeddings follow its teacher's: pure math on two [n, d]
matrices (row i of both is the same sentence), no model in sight.

Three views, because they fail differently:
- cosine of each sentence's student and teacher embedding (mean, min, 5th percentile): the
  number that says whether the student can replace the teacher in an existing vector index.
  Defined only when both live in the same space (same width); a student with its own space
  (another model, a resized hidden size) gets None here and is judged by the two below.
- neighbour recall@k: for each query sentence, the share of the teacher's k nearest neighbours
  (cosine, the query itself excluded) that the student also puts in its k nearest, averaged over
  queries. What search / RAG users feel; invariant to any rotation of the space.
- Spearman correlation of pairwise similarities: the cosine of the same sentence pairs under
  both models, rank-correlated. Invariant to rotations and to any monotone rescaling of
  similarity. Pairs are drawn uniformly at random (seeded) among distinct sentences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DEFAULT_K = 10
DEFAULT_PAIRS = 20_000
_QUERY_CHUNK = 1024  # rows of the [queries, n] similarity matrix held at once


@dataclass
class EmbeddingFidelity:
    """Student vs teacher on the same sentences; `to_dict()` is JSON-ready."""

    sentences: int
    queries: int
    k: int
    pairs: int
    recall_at_k: float
    spearman: float
    cosine_mean: float | None = None
    cosine_min: float | None = None
    cosine_p05: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.detach().to(torch.float64), dim=-1)


def row_cosines(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[n] cosine of row i of `student` with row i of `teacher` (both [n, d])."""
    if student.shape != teacher.shape:
        raise ValueError(f"row cosines need the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    return (_unit(student) * _unit(teacher)).sum(-1)


def _top_k(unit: torch.Tensor, queries: int, k: int) -> torch.Tensor:
    """[queries, k] indices of each query row's k most similar rows, the row itself excluded."""
    out = []
    for start in range(0, queries, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, queries)
        sims = unit[start:stop] @ unit.T  # [chunk, n]
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -torch.inf  # a sentence is not its own neighbour
        out.append(sims.topk(k, dim=-1).indices)
    return torch.cat(out)


def neighbour_recall(
    student: torch.Tensor, teacher: torch.Tensor, *, k: int = DEFAULT_K, queries: int | None = None
) -> torch.Tensor:
    """[queries] recall@k per query: the first `queries` rows (default all) query the whole set.

    Both matrices index the same sentences; their widths may differ (each model's own space)."""
    n = teacher.shape[0]
    if student.shape[0] != n:
        raise ValueError(f"student has {student.shape[0]} rows, teacher {n}")
    if not 1 <= k < n:
        raise ValueError(f"recall@k needs 1 <= k < sentences (k={k}, sentences={n})")
    queries = n if queries is None else min(queries, n)
    wanted = _top_k(_unit(teacher), queries, k)
    found = _top_k(_unit(student), queries, k)
    hits = (wanted.unsqueeze(2) == found.unsqueeze(1)).any(dim=2).sum(dim=1)  # [queries]
    return hits.to(torch.float64) / k


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-d tensor, ties given their average rank (as Spearman's rho wants)."""
    n = x.shape[0]
    order = torch.argsort(x, stable=True)
    ordered = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts.long(), 0) - 1  # tie group of each sorted position
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, torch.arange(n, dtype=torch.float64))
    mean_rank = sums / torch.bincount(group).to(torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    out[order] = mean_rank[group]
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-d tensors (Pearson of their average ranks); 0.0 when
    either is constant (no order to agree with)."""
    if x.shape != y.shape or x.dim() != 1 or x.shape[0] < 2:
        raise ValueError(f"spearman needs two 1-d tensors of the same length >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    rx, ry = ranks(x.detach().cpu()), ranks(y.detach().cpu())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else 0.0


def sentence_pairs(n: int, count: int = DEFAULT_PAIRS, seed: int = 0) -> torch.Tensor:
    """[m, 2] pairs (i, j), i < j: every pair when there are at most `count`, else `count` pairs
    drawn uniformly with replacement (seeded), so the same n and seed give the same pairs."""
    if n < 2:
        raise ValueError(f"pairs need at least 2 sentences, got {n}")
    if n * (n - 1) // 2 <= count:
        return torch.triu_indices(n, n, offset=1).T
    generator = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (count,), generator=generator)
    j = (i + torch.randint(1, n, (count,), generator=generator)) % n  # j != i
    return torch.stack([torch.minimum(i, j), torch.maximum(i, j)], dim=1)


def pair_similarities(embeddings: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """[m] cosine similarity of each pair's two rows."""
    unit = _unit(embeddings)
    return (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(-1)


def embedding_fidelity(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    queries: int | None = None,
    pairs: int = DEFAULT_PAIRS,
    seed: int = 0,
) -> EmbeddingFidelity:
    """Cosine (when the widths match), neighbour recall@k and similarity Spearman of `student`
    against `teacher`, both [n, d] over the same n sentences."""
    n = teacher.shape[0]
    recall = neighbour_recall(student, teacher, k=k, queries=queries)
    chosen = sentence_pairs(n, pairs, seed)
    rho = spearman(pair_similarities(student, chosen), pair_similarities(teacher, chosen))
    result = EmbeddingFidelity(
        sentences=n, queries=recall.shape[0], k=k, pairs=chosen.shape[0], recall_at_k=float(recall.mean()), spearman=rho
    )
    if student.shape[1] == teacher.shape[1]:
        cosines = row_cosines(student, teacher)
        result.cosine_mean = float(cosines.mean())
        result.cosine_min = float(cosines.min())
        result.cosine_p05 = float(torch.quantile(cosines, 0.05))
    return result
