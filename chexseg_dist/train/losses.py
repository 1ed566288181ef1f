"""Segmentation losses for the student, chosen by name (``train_segmentation.loss``).

Every loss takes logits ``[B, 10, S, S]``, binary targets of the same shape, and per (row, channel) weights
``[B, 10]``: a row's source weight (``expert_weight`` / ``pseudo_weight``) times 0 for a channel left out of the loss
(``ignore_uncertain``). With all weights 1 the losses are the plain batch losses the paper used.

- ``dice``: class-averaged soft Dice over the batch: for each pathology c, ``1 - (2 sum(w p g) + 1) / (sum(w p) +
  sum(w g) + 1)`` with p the sigmoid, summed over the rows and pixels of the batch; the mean over the 10 classes.
  The +1 keeps empty classes defined: where a class has no foreground in the batch its Dice falls as p grows, which
  teaches empty masks.
- ``bce_dice``: the weighted mean binary cross-entropy per pixel plus ``dice``.

Distillation (:func:`distillation_loss`): binary cross-entropy of the student's sigmoid(logits / T) against the
teacher's sigmoid(teacher logits / T) (soft targets), per pixel and class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Added to the numerator and denominator of every class's Dice (see the module docstring).
DICE_SMOOTH = 1.0


def _expand(weights: Tensor, like: Tensor) -> Tensor:
    return weights.to(like.dtype)[:, :, None, None].expand_as(like)


def soft_dice(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Class-averaged soft Dice loss over the batch (a scalar in [0, 1])."""
    p = torch.sigmoid(logits.float())
    w = _expand(weights, p)
    g = targets.to(p.dtype)
    dims = (0, 2, 3)
    inter = (w * p * g).sum(dims)
    total = (w * p).sum(dims) + (w * g).sum(dims)
    dice = (2 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)
    return 1.0 - dice.mean()


def bce_dice(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean per-pixel binary cross-entropy plus :func:`soft_dice`."""
    w = _expand(weights, logits.float())
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (bce * w).sum() / w.sum().clamp_min(1.0) + soft_dice(logits, targets, weights)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Sigmoid cross-entropy of ``student / T`` against the soft targets ``sigmoid(teacher / T)`` (mean)."""
    targets = torch.sigmoid(teacher_logits.float() / temperature)
    return F.binary_cross_entropy_with_logits(student_logits.float() / temperature, targets)
