"""Encoder distillation losses: values by hand, invariances, masking and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kompakt.ops.encoder_kd import (
    attention_kl,
    cosine_loss,
    mse_loss,
    neighbour_kl,
    relation_kl,
    relations_kl,
    similarity_loss,
)


def test_cosine_and_mse_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    student = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # cos 45° = 1/√2 for the first sentence, 1 for the second
    assert cosine_loss(student, teacher).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert mse_loss(student, teacher).item() == pytest.approx((0 + 1 + 0 + 1) / 4, abs=1e-6)
    assert cosine_loss(3 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def _states(seed: int, batch=2, length=5, width=8) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


def test_relation_kl_is_zero_for_identical_states_and_positive_otherwise():
    mask = torch.ones(2, 5)
    x = _states(0)
    assert relation_kl(x, x, 2, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_kl(_states(1), x, 2, mask).item() > 0.01


def test_relation_kl_compares_different_widths_through_relation_heads():
    """A student of width 4 vs a teacher of width 8: both give [B, 2, T, T] relations."""
    mask = torch.ones(2, 5)
    teacher = _states(0)
    student = teacher[..., ::2].clone().requires_grad_(True)  # [2, 5, 4]
    loss = relation_kl(student, teacher, 2, mask)
    loss.backward()
    assert torch.isfinite(loss) and student.grad is not None and student.grad.abs().sum() > 0


def test_relation_of_a_rotated_copy_is_identical():
    """x·xᵀ is invariant to an orthogonal map of each head's features: the loss is 0, as
    MiniLM v2 intends (relations, not coordinates, are transferred)."""
    mask = torch.ones(2, 5)
    teacher = _states(3, width=4)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    assert relation_kl(teacher @ rotation, teacher, 1, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_padding_is_ignored_by_relations_and_attention():
    """Changing what sits at padded positions changes nothing."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    teacher, student = _states(0), _states(1)
    altered = student.clone()
    altered[0, 3:] = 100.0
    assert relation_kl(altered, teacher, 2, mask).item() == pytest.approx(relation_kl(student, teacher, 2, mask).item(), rel=1e-5)
    a = attention_kl((altered, altered), (teacher, teacher), 2, 2, mask).item()
    b = attention_kl((student, student), (teacher, teacher), 2, 2, mask).item()
    assert a == pytest.approx(b, rel=1e-5)


def test_attention_kl_by_hand_on_one_head():
    """One query, two keys: teacher attends [1/2, 1/2], student [1/(1+e), e/(1+e)]."""
    mask = torch.ones(1, 2)
    teacher_q, teacher_k = torch.zeros(1, 2, 1), torch.zeros(1, 2, 1)
    student_q = torch.ones(1, 2, 1)
    student_k = torch.tensor([[[0.0], [1.0]]])
    p = torch.tensor([0.5, 0.5])
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    expected = float((p * (p.log() - q.log())).sum())
    value = attention_kl((student_q, student_k), (teacher_q, teacher_k), 1, 1, mask).item()
    assert value == pytest.approx(expected, abs=1e-6)


def test_attention_kl_refuses_different_head_counts():
    mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="relation loss"):
        attention_kl((_states(0), _states(0)), (_states(1), _states(1)), 2, 4, mask)


def test_relations_kl_averages_q_k_v():
    mask = torch.ones(2, 5)
    teacher = {r: _states(i) for i, r in enumerate("qkv")}
    student = {"q": teacher["q"], "k": teacher["k"], "v": _states(9)}
    expected = relation_kl(student["v"], teacher["v"], 2, mask).item() / 3
    assert relations_kl(student, teacher, 2, mask).item() == pytest.approx(expected, rel=1e-5)


def test_losses_stay_exact_under_bf16_autocast():
    """Near-uniform attention maps differ by ~1e-6 in KL; bf16 rounding made it negative."""
    q = 0.1 * _states(0, width=16)
    k = 0.1 * _states(1, width=16)
    near = q + 0.01 * _states(2, width=16)
    mask = torch.ones(2, 5)
    exact = attention_kl((near, k), (q, k), 2, 2, mask).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = attention_kl((near, k), (q, k), 2, 2, mask)
        relation = relation_kl(near, q, 2, mask)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(exact, rel=1e-4)
    assert relation.item() >= 0


def test_similarity_loss_by_hand_and_blind_to_scale_and_rotation():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # sentence 1 moved onto sentence 0
    s = torch.nn.functional.normalize(student, dim=-1)
    t = torch.nn.functional.normalize(teacher, dim=-1)
    diff = s @ s.T - t @ t.T  # off-diagonal: (0,1) 1 - 0, (1,2) and (0,2) equal on both sides but (1,2)
    expected = (diff.pow(2).sum() - diff.diagonal().pow(2).sum()) / 6
    assert math.isclose(float(similarity_loss(student, teacher)), float(expected), rel_tol=1e-6)
    assert float(similarity_loss(student, teacher)) > 0.1
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assert float(similarity_loss(3.0 * teacher @ rotation, teacher)) < 1e-12  # same neighbours: no loss
    assert float(similarity_loss(teacher[:1], teacher[:1])) == 0.0


def test_neighbour_kl_by_hand_and_blind_to_scale():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.softmax(torch.nn.functional.normalize(teacher, dim=-1) @ bank.T / 0.5, dim=-1)
    q = torch.softmax(torch.nn.functional.normalize(student, dim=-1) @ bank.T / 0.5, dim=-1)
    expected = float((p * (p.log() - q.log())).sum())
    assert math.isclose(float(neighbour_kl(student, teacher, bank, 0.5)), expected, rel_tol=1e-5)
    assert float(neighbour_kl(5.0 * teacher, teacher, bank, 0.5)) < 1e-7  # same direction: no loss


def test_neighbour_kl_leaves_each_sentence_own_bank_row_out():
    g = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    teacher, student = bank[[1, 4]] * 2.0, torch.randn(2, 4, generator=g)
    own = torch.tensor([1, -1])  # the first sentence is bank row 1, the second is not in the bank
    value = neighbour_kl(student, teacher, bank, 0.1, own)
    first = neighbour_kl(student[:1], teacher[:1], bank[[0, 2, 3, 4, 5]], 0.1)
    second = neighbour_kl(student[1:], teacher[1:], bank, 0.1)
    assert math.isfinite(float(value))
    assert math.isclose(float(value), float((first + second) / 2), rel_tol=1e-5)
    student.requires_grad_(True)
    neighbour_kl(student, teacher, bank, 0.1, own).backward()
    assert torch.isfinite(student.grad).all()
