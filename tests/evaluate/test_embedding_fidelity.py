"""Embedding fidelity math on synthetic embeddings: identical, rotated, noisier and noisier."""

from __future__ import annotations

import pytest
import torch

from kompakt.evaluate.embedding_fidelity import (
    embedding_fidelity,
    neighbour_recall,
    ranks,
    row_cosines,
    sentence_pairs,
    spearman,
)


def _clustered(n: int = 400, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Embeddings with structure (clusters), so nearest neighbours mean something."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g)
    return centres[torch.arange(n) % 20] + 0.4 * torch.randn(n, d, generator=g)


def _rotation(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_identical_embeddings_score_one_everywhere():
    teacher = _clustered()
    result = embedding_fidelity(teacher.clone(), teacher)
    assert result.cosine_mean == pytest.approx(1.0, abs=1e-9)
    assert result.cosine_min == pytest.approx(1.0, abs=1e-9)
    assert result.recall_at_k == 1.0
    assert result.spearman == pytest.approx(1.0, abs=1e-9)
    assert (result.sentences, result.queries, result.k) == (400, 400, 10)


def test_a_rotation_keeps_neighbours_and_similarities_but_not_cosine():
    teacher = _clustered()
    rotated = teacher @ _rotation(teacher.shape[1])
    result = embedding_fidelity(rotated, teacher)
    assert result.recall_at_k == pytest.approx(1.0)
    assert result.spearman == pytest.approx(1.0, abs=1e-9)
    assert result.cosine_mean < 0.5


def test_more_noise_lowers_every_metric():
    teacher = _clustered()
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(teacher.shape, generator=g)
    scores = [embedding_fidelity(teacher + level * noise, teacher) for level in (0.1, 0.3, 0.6, 1.2)]
    for worse, better in zip(scores[1:], scores[:-1]):
        assert worse.cosine_mean < better.cosine_mean
        assert worse.recall_at_k < better.recall_at_k
        assert worse.spearman < better.spearman
    assert scores[-1].recall_at_k < 0.9


def test_a_different_width_gives_no_cosine_but_recall_and_spearman():
    teacher = _clustered(d=32)
    wider = torch.cat([teacher, torch.zeros(teacher.shape[0], 8)], dim=1)  # same geometry, 40 dims
    result = embedding_fidelity(wider, teacher)
    assert result.cosine_mean is None and result.cosine_p05 is None
    assert result.recall_at_k == pytest.approx(1.0)
    assert result.spearman == pytest.approx(1.0, abs=1e-9)


def test_recall_excludes_the_query_itself_and_counts_per_query():
    # 4 points on a line: each one's single nearest neighbour (k=1) is known.
    teacher = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.9, 0.1], [0.0, 1.0]])  # rows 1 and 2 swapped
    recall = neighbour_recall(student, teacher, k=1)
    # teacher: 0->1, 1->0, 2->3, 3->2; student: 0->2, 1->3, 2->0, 3->1
    assert recall.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert neighbour_recall(teacher, teacher, k=1, queries=2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        neighbour_recall(teacher, teacher, k=4)


def test_spearman_uses_average_ranks_for_ties_and_matches_known_values():
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone: 1 whatever the scale
    assert spearman(x, -x) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1,2,3,4,5], [5,6,7,8,7]) = 0.8207826816681233
    assert spearman(x, torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])) == pytest.approx(0.8207826816681233)
    assert spearman(x, torch.ones(5)) == 0.0


def test_pairs_are_all_pairs_when_few_and_seeded_distinct_pairs_when_many():
    assert sentence_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    many = sentence_pairs(1000, count=500, seed=3)
    assert many.shape == (500, 2) and bool((many[:, 0] < many[:, 1]).all())
    assert torch.equal(many, sentence_pairs(1000, count=500, seed=3))


def test_row_cosines_refuse_different_shapes():
    with pytest.raises(ValueError):
        row_cosines(torch.ones(3, 4), torch.ones(3, 5))
