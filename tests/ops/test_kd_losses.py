"""KD losses against values computed by hand (two- and three-token vocabularies)."""

from __future__ import annotations

import math

import pytest
import torch

from kompakt.ops.kd_losses import (
    HiddenProjection,
    TopK,
    divergence,
    hidden_state_loss,
    kd_loss,
    uniform_layer_map,
)

LN3 = math.log(3.0)
# teacher p = [1/4, 3/4], student q = [1/2, 1/2]
TEACHER = torch.tensor([[0.0, LN3]])
STUDENT = torch.tensor([[0.0, 0.0]])
FORWARD = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL(p || q) = 0.130812
REVERSE = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)  # KL(q || p) = 0.143841
M = (0.375, 0.625)
JSD = 0.5 * (0.25 * math.log(0.25 / M[0]) + 0.75 * math.log(0.75 / M[1])) + 0.5 * (
    0.5 * math.log(0.5 / M[0]) + 0.5 * math.log(0.5 / M[1])
)


@pytest.mark.parametrize("kind, expected", [("forward", FORWARD), ("reverse", REVERSE), ("jsd", JSD)])
def test_divergences_by_hand(kind, expected):
    assert divergence(STUDENT, TEACHER, kind=kind).item() == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_temperature_divides_logits_and_t_squared_scales_the_soft_term():
    teacher = TEACHER * 2  # at T = 2 this is p again
    assert divergence(STUDENT, teacher, temperature=2.0).item() == pytest.approx(FORWARD, abs=1e-6)
    loss, parts = kd_loss(STUDENT, teacher, None, alpha=1.0, temperature=2.0)
    assert loss.item() == pytest.approx(4 * FORWARD, abs=1e-6)
    assert parts == {"kd": pytest.approx(FORWARD, abs=1e-6)}


def test_alpha_mixes_soft_and_hard_terms():
    labels = torch.tensor([1])
    loss, parts = kd_loss(STUDENT, TEACHER * 2, labels, alpha=0.5, temperature=2.0)
    assert loss.item() == pytest.approx(0.5 * 4 * FORWARD + 0.5 * math.log(2.0), abs=1e-6)
    assert parts["ce"] == pytest.approx(math.log(2.0), abs=1e-6)
    ce_only, parts = kd_loss(STUDENT, None, labels, alpha=0.0)
    assert ce_only.item() == pytest.approx(math.log(2.0), abs=1e-6) and "kd" not in parts


def test_no_counted_position_gives_zero_not_nan():
    loss, parts = kd_loss(STUDENT, TEACHER, torch.tensor([-100]), alpha=0.5)
    assert loss.item() == 0.0 and parts == {"kd": 0.0, "ce": 0.0}


def test_ignored_positions_count_in_neither_term():
    student = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    teacher = torch.tensor([[0.0, LN3], [-5.0, 5.0]])  # second position: far apart, but ignored
    labels = torch.tensor([1, -100])
    loss, _ = kd_loss(student, teacher, labels, alpha=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * FORWARD + 0.5 * math.log(2.0), abs=1e-6)


def test_top_k_renormalises_the_teacher():
    teacher = torch.tensor([[0.0, LN3, -30.0]])
    student = torch.zeros(1, 3)
    top = TopK.of(teacher, 2)
    assert top.indices.tolist() == [[1, 0]]
    # forward: renormalised p = [1/4, 3/4] against the student's full q = 1/3 each
    expected = 0.25 * math.log(0.25 * 3) + 0.75 * math.log(0.75 * 3)
    assert divergence(student, top).item() == pytest.approx(expected, abs=1e-6)
    # reverse: both renormalised over the support: q = [1/2, 1/2]
    assert divergence(student, top, kind="reverse").item() == pytest.approx(REVERSE, abs=1e-6)
    full = divergence(student, teacher).item()
    assert divergence(student, TopK.of(teacher, 3)).item() == pytest.approx(full, abs=1e-6)


def test_identical_distributions_have_zero_loss_and_gradients_flow():
    student = torch.randn(2, 5, 7, requires_grad=True)
    for kind in ("forward", "reverse", "jsd"):
        assert divergence(student, student.detach(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)
    loss, _ = kd_loss(student, torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), alpha=0.5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(STUDENT, TEACHER, kind="kl2")
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(STUDENT, TEACHER, torch.tensor([1]), alpha=1.5)
    with pytest.raises(ValueError, match="needs teacher"):
        kd_loss(STUDENT, None, torch.tensor([1]), alpha=0.5)


def test_layer_map_and_hidden_loss_by_hand():
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert uniform_layer_map(22, 30)[-1] == (22, 30)
    zeros = torch.zeros(1, 1, 2)
    student = [zeros, torch.tensor([[[1.0, 2.0]]])]
    teacher = [zeros, zeros, torch.tensor([[[1.0, 4.0]]])]
    assert hidden_state_loss(student, teacher, [(1, 2)]).item() == pytest.approx(2.0)  # (0 + 4) / 2
    with pytest.raises(ValueError, match="widths differ"):
        hidden_state_loss([zeros, torch.zeros(1, 1, 3)], teacher, [(1, 2)])
    projection = HiddenProjection(1, 3, 2)  # starts as "copy the first two dims"
    wide = [zeros, torch.tensor([[[1.0, 4.0, 9.0]]])]
    assert hidden_state_loss(wide, teacher, [(1, 2)], projection=projection).item() == pytest.approx(0.0)


def test_relative_hidden_loss_by_hand():
    zeros = torch.zeros(1, 2, 2)
    # position 0: error (0 + 4) / 2 over |t|^2 (1 + 16) / 2; position 1: a 100x longer teacher, 10 % off per entry
    student = [zeros, torch.tensor([[[1.0, 2.0], [90.0, 90.0]]])]
    teacher = [zeros, torch.tensor([[[1.0, 4.0], [100.0, 100.0]]])]
    per_position = [2.0 / 8.5, 100.0 / 10000.0]
    assert hidden_state_loss(student, teacher, [(1, 1)], relative=True).item() == pytest.approx(sum(per_position) / 2)
    mask = torch.tensor([[True, False]])
    assert hidden_state_loss(student, teacher, [(1, 1)], relative=True, mask=mask).item() == pytest.approx(per_position[0])
    # scale-free: the same states 1000x longer give the same loss; the raw MSE grows 10^6 times
    big = ([h * 1000 for h in student], [h * 1000 for h in teacher])
    assert hidden_state_loss(*big, [(1, 1)], relative=True).item() == pytest.approx(sum(per_position) / 2)
    assert hidden_state_loss(*big, [(1, 1)]).item() == pytest.approx(1e6 * hidden_state_loss(student, teacher, [(1, 1)]).item())
    # a zero teacher vector (padding) is floored, not divided by 0
    padded = [zeros, torch.tensor([[[1.0, 4.0], [0.0, 0.0]]])]
    assert torch.isfinite(hidden_state_loss(student, padded, [(1, 1)], relative=True))
