"""Loading a classifier or an ensemble of them, and predicting probabilities with all-class Grad-CAM maps.

Ensembles: :func:`load_classifier` takes one path, a list, or a comma-separated string. Members must share
``image_size`` and ``labels``. :func:`predict_with_cams` returns the mean of the members' probabilities and the
mean of the members' raw Grad-CAM maps: each member's maps are computed on its own (logit-based, raw, at its own
target layer) and only then averaged. Members whose grids differ are bilinearly resized
(``align_corners=False``, both grids span the whole frame) to the finest grid before averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.errors import CheckpointError
from chexseg_dist.models.checkpoint import (
    LoadedClassifier,
    ensemble_fingerprint,
    load_checkpoint,
    split_paths,
)
from chexseg_dist.saliency.gradcam import grad_cam


@dataclass
class LoadedEnsemble:
    """Several checkpoints used as one classifier (mean probabilities, mean maps).

    Attributes:
        members: the loaded members, in the order given.
        fingerprint: SHA-256 over the sorted member fingerprints (order does not change the ensemble).
        meta: ``{"ensemble": True, "members": [member meta...], "image_size", "labels", "fingerprint"}``.
    """

    members: list[LoadedClassifier]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.members[0].image_size

    @property
    def labels(self) -> tuple[str, ...]:
        return self.members[0].labels

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members]


Loaded = LoadedClassifier | LoadedEnsemble


def load_classifier(
    paths: str | Sequence[str],
    device: str | torch.device = "cpu",
    *,
    expected_labels: Sequence[str] | None = OBSERVATIONS,
) -> Loaded:
    """Load one checkpoint or an ensemble of several.

    Args:
        paths: a checkpoint directory, a list of them, or a comma-separated string of them.
        device: where to put the model(s).
        expected_labels: see :func:`load_checkpoint`.

    Returns:
        A :class:`LoadedClassifier` for one path, a :class:`LoadedEnsemble` for several.

    Raises:
        CheckpointError: no path given, any member fails to load, or members differ in ``image_size`` or
            ``labels`` (naming both paths).
    """
    items = split_paths(paths)
    if not items:
        raise CheckpointError(f"load_classifier: no checkpoint path given ({paths!r})")
    members = [load_checkpoint(p, device, expected_labels=expected_labels) for p in items]
    if len(members) == 1:
        return members[0]
    first = members[0]
    for other in members[1:]:
        for fld in ("image_size", "labels"):
            if getattr(other, fld) != getattr(first, fld):
                raise CheckpointError(
                    f"ensemble members disagree on {fld}: {first.path} has {getattr(first, fld)!r}, "
                    f"{other.path} has {getattr(other, fld)!r}; ensemble only checkpoints trained for the same "
                    "frame size and outputs"
                )
    fingerprint = ensemble_fingerprint(m.fingerprint for m in members)
    meta = {
        "ensemble": True,
        "members": [m.meta | {"path": m.path} for m in members],
        "image_size": first.image_size,
        "labels": list(first.labels),
        "fingerprint": fingerprint,
    }
    return LoadedEnsemble(members=members, fingerprint=fingerprint, meta=meta)


def predict_with_cams(loaded: Loaded, images: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities and all-class Grad-CAM maps: the one call the pseudo-labelling pipeline makes.

    Args:
        loaded: from :func:`load_classifier` (single checkpoint or ensemble).
        images: ``[B, 1, S, S]`` letterboxed frames, float in ``[0, 1]`` or uint8 in ``[0, 255]`` (divided by
            255 here), on any device (moved to each model's device); ``S`` must be the checkpoint's image_size.

    Returns:
        ``(probs, cams)``: sigmoid probabilities ``[B, K]`` in ``[0, 1]`` and raw logit Grad-CAM maps
        ``[B, K, h, w]`` >= 0 at the target layer's grid (e.g. 10 x 10 for DenseNet121 at 320 px), float32 on the
        (first) model's device. For an ensemble both are means over members (see the module docstring).

    Raises:
        ValueError: images not ``[B, 1, S, S]`` with ``S`` = the checkpoint's image_size.
    """
    members = loaded.members if isinstance(loaded, LoadedEnsemble) else [loaded]
    size = loaded.image_size
    if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
        raise ValueError(
            f"predict_with_cams: expected frames [B, 1, {size}, {size}] for checkpoint(s) {loaded.paths}, "
            f"got {tuple(images.shape)}; letterbox to classifier.image_size={size}"
        )
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    probs: list[Tensor] = []
    cams: list[Tensor] = []
    out_device = next(members[0].model.parameters()).device
    for member in members:
        device = next(member.model.parameters()).device
        logits, member_cams = grad_cam(member.model, images.to(device, torch.float32), member.target_layer)
        probs.append(torch.sigmoid(logits).to(out_device))
        cams.append(member_cams.to(out_device))
    if len(members) == 1:
        return probs[0], cams[0]
    grid = max((c.shape[-2:] for c in cams), key=lambda s: s[0] * s[1])
    resized = [
        c if c.shape[-2:] == grid else F.interpolate(c, size=tuple(grid), mode="bilinear", align_corners=False)
        for c in cams
    ]
    return torch.stack(probs).mean(0), torch.stack(resized).mean(0)
