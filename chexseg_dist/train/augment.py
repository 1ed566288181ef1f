"""Radiograph-safe augmentation on batches of frames: small affine, brightness and contrast, no flips by default."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AugmentSettings(Protocol):
    """The augmentation fields of a training section (``train_classifier`` has them)."""

    aug_rotate_deg: float
    aug_scale: float
    aug_translate: float
    aug_brightness: float
    aug_contrast: float
    hflip: bool


def augment_batch(images: Tensor, tc: AugmentSettings, generator: torch.Generator | None = None) -> Tensor:
    """Radiograph-safe augmentation of a batch, each image with its own random parameters.

    Intensity jitter -- a gain ``1 +- aug_brightness`` and a gamma ``exp(+-aug_contrast)``, clipped to [0, 1]; both
    keep black at 0, so the letterbox padding stays exactly what evaluation sees -- then a small affine (rotation
    ``+-aug_rotate_deg``, isotropic scale ``1 +- aug_scale``, translation ``+-aug_translate`` of the frame side),
    bilinear, with zero (black) fill like the letterbox padding. A horizontal flip (probability 0.5) only when
    ``tc.hflip``: anatomy is lateralised (heart on the left, situs), so it is off by default.

    Args:
        images: ``[B, 1, S, S]`` float in [0, 1], any device.
        tc: the training config (the ``aug_*`` fields and ``hflip``).
        generator: a CPU generator for reproducible draws (parameters are drawn on CPU, then moved).

    Returns:
        ``[B, 1, S, S]`` float in [0, 1] on the same device.
    """
    return augment_pair(images, None, tc, generator)[0]


def augment_pair(
    images: Tensor, masks: Tensor | None, tc: AugmentSettings, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """:func:`augment_batch` of images plus the same geometric transform of their masks (segmentation).

    Args:
        images: ``[B, 1, S, S]`` float in [0, 1].
        masks: ``[B, C, S, S]`` binary masks of the same images (any dtype), or None.

    Returns:
        The augmented images and masks (masks resampled bilinearly, then ``>= 0.5``, in their dtype).
    """
    b = images.shape[0]
    if b == 0:
        return images, masks

    def uniform(bound: float) -> Tensor:
        return (torch.rand(b, generator=generator) * 2.0 - 1.0) * bound

    gain = (1.0 + uniform(tc.aug_brightness)).view(b, 1, 1, 1).to(images)
    gamma = torch.exp(uniform(tc.aug_contrast)).view(b, 1, 1, 1).to(images)
    out = (images.clamp(0.0, 1.0).pow(gamma) * gain).clamp(0.0, 1.0)
    angle = uniform(math.radians(tc.aug_rotate_deg))
    scale = 1.0 + uniform(tc.aug_scale)
    # affine_grid maps output coordinates to input coordinates in [-1, 1] (frame side = 2): to enlarge the content
    # by ``scale`` the sampling grid shrinks by it; translation by t of the side is 2t in these units.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = uniform(2.0 * tc.aug_translate)
    theta[:, 1, 2] = uniform(2.0 * tc.aug_translate)
    if tc.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        theta[flip, :, 0] *= -1.0
    grid = F.affine_grid(theta.to(images), list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is None:
        return out, None
    warped = F.grid_sample(masks.to(images.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out, (warped >= 0.5).to(masks.dtype)
