"""The inter-pixel affinity network (IRNet's idea, light): a class-agnostic boundary map at stride 4.

A small fully convolutional encoder (no pretrained weights: nothing is downloaded) maps a radiograph frame
``[B, 1, h, w]`` in [0, 1] to boundary probabilities ``[B, ceil(h/4), ceil(w/4)]``; affinities between cells are
``1 - max boundary`` on the segment between them (:func:`chexseg_dist.masks.refine.path_affinity`). Dilated
convolutions give each cell a receptive field of ~70 frame pixels. A checkpoint is a directory holding
``model.pt`` and, written last, ``affinity.json`` (frame size, width, training radius, fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from chexseg_dist.errors import CheckpointError
from chexseg_dist.models.checkpoint import load_strict, read_json_meta, read_weights, unwrap, write_checkpoint_dir

AFFINITY_FORMAT = "chexseg-affinity"
AFFINITY_FORMAT_VERSION = 1
AFFINITY_META = "affinity.json"
AFFINITY_WEIGHTS = "model.pt"
#: Frame pixels per boundary cell.
STRIDE = 4


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BoundaryNet(nn.Module):
    """Frames ``[B, 1, h, w]`` in [0, 1] -> boundary probabilities ``[B, ceil(h/4), ceil(w/4)]``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = int(width)
        half = max(8, width // 2)
        self.features = nn.Sequential(
            _block(1, half, stride=2),
            _block(half, half),
            _block(half, width, stride=2),
            _block(width, width),
            _block(width, width, dilation=2),
            _block(width, width, dilation=4),
            _block(width, width, dilation=8),
        )
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.features(x)))[:, 0]


@dataclass
class LoadedAffinity:
    """A loaded affinity checkpoint: the model (eval mode) and its metadata."""

    model: BoundaryNet
    meta: dict[str, Any]
    path: str

    @property
    def frame(self) -> int:
        return int(self.meta["frame"])


def save_affinity(path: str, model: nn.Module, *, frame: int, radius: int, config: dict[str, Any], metrics: Any) -> str:
    """Write ``model.pt`` then ``affinity.json`` into the directory ``path`` (local or URI)."""
    bare = unwrap(model)
    if not isinstance(bare, BoundaryNet):
        raise TypeError(f"save_affinity: expected a BoundaryNet, got {type(bare).__name__}")
    meta = {
        "format": AFFINITY_FORMAT,
        "format_version": AFFINITY_FORMAT_VERSION,
        "width": bare.width,
        "stride": STRIDE,
        "frame": int(frame),
        "radius": int(radius),
        "metrics": metrics,
        "config": config,
    }
    return write_checkpoint_dir(path, bare, meta, AFFINITY_META, AFFINITY_WEIGHTS)


def load_affinity(path: str, device: str | torch.device = "cpu") -> LoadedAffinity:
    """Load an affinity checkpoint directory (weights checked against their fingerprint).

    Raises:
        CheckpointError: not an affinity checkpoint (naming the path and the fix), or weights that do not fit.
    """
    meta = read_json_meta(path, AFFINITY_META, "an affinity checkpoint (chexseg train-affinity)")
    if meta.get("format") != AFFINITY_FORMAT or meta.get("format_version") != AFFINITY_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}/{AFFINITY_META}: format {meta.get('format')!r} version {meta.get('format_version')!r}"
            f"; expected {AFFINITY_FORMAT!r} version {AFFINITY_FORMAT_VERSION} (chexseg train-affinity)"
        )
    state = read_weights(path, AFFINITY_WEIGHTS, meta["fingerprint"])
    model = BoundaryNet(int(meta["width"]))
    load_strict(model, state, f"checkpoint {path}: the weights do not fit a BoundaryNet of width {meta['width']}")
    model.to(device).eval()
    return LoadedAffinity(model, meta, path)
