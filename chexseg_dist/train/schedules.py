"""Learning-rate schedules: ``factor(step, total_steps)`` multiplying the base rate, chosen by name.

The names are listed in :data:`~chexseg_dist.core.registry.SCHEDULES` (config validation reads them there).
"""

from __future__ import annotations

import math

import torch

from chexseg_dist.core.registry import SCHEDULES


def cosine(step: int, total_steps: int) -> float:
    """Half a cosine from 1 at step 0 to 0 at ``total_steps`` (then 0)."""
    if total_steps <= 0:
        return 1.0
    progress = min(step / total_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, total_steps: int) -> float:
    """1 throughout (the paper's classifier and student: Adam without a schedule)."""
    return 1.0


def create_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping the named schedule once per optimizer step over ``total_steps``."""
    factor = SCHEDULES.get(name, "lr_schedule")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, total_steps))
