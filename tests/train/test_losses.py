"""The student's losses: class-averaged soft Dice with per-row, per-channel weights; BCE + Dice; distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chexseg_dist.train.losses import bce_dice, distillation_loss, soft_dice


def test_soft_dice_is_near_zero_for_a_confident_exact_prediction_and_near_one_for_the_opposite() -> None:
    target = torch.zeros(2, 10, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    weights = torch.ones(2, 10)
    assert float(soft_dice((target * 2 - 1) * 20, target, weights)) < 0.01
    assert float(soft_dice((1 - target * 2) * 20, target, weights)) > 0.95


def test_a_zero_weight_removes_that_row_and_channel_from_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 8, 8, requires_grad=True)
    target = (torch.rand(3, 10, 8, 8) > 0.5).float()
    weights = torch.ones(3, 10)
    weights[1, 4] = 0.0  # e.g. an uncertain label under ignore_uncertain
    for loss_fn in (soft_dice, bce_dice):
        logits.grad = None
        loss_fn(logits, target, weights).backward()
        assert logits.grad is not None
        assert float(logits.grad[1, 4].abs().sum()) == 0.0
        assert float(logits.grad[0, 4].abs().sum()) > 0.0 and float(logits.grad[1, 3].abs().sum()) > 0.0
    # Changing what the ignored channel's target says changes nothing.
    flipped = target.clone()
    flipped[1, 4] = 1 - flipped[1, 4]
    assert torch.allclose(soft_dice(logits, target, weights), soft_dice(logits, flipped, weights))


def test_distillation_targets_are_the_teachers_sigmoid_at_temperature_t() -> None:
    torch.manual_seed(1)
    teacher = torch.randn(2, 10, 4, 4) * 30
    student = torch.randn(2, 10, 4, 4, requires_grad=True)
    t = 10.0
    loss = distillation_loss(student, teacher, t)
    expected = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))
    assert torch.allclose(loss, expected)
    # Smallest where the student's tempered sigmoid equals the teacher's: zero gradient at student = teacher.
    at_teacher = teacher.clone().requires_grad_(True)
    distillation_loss(at_teacher, teacher, t).backward()
    assert at_teacher.grad is not None and float(at_teacher.grad.abs().max()) < 1e-7
