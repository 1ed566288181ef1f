"""The model contract shared by every classifier (and, with its own output shape, every segmentation model).

Input: images ``[B, 1, S, S]`` float32 in ``[0, 1]``, the grayscale letterboxed frame (a uint8 frame from the
pipeline is divided by 255 first). Normalisation and the expansion to 3 channels that torchvision backbones expect
happen inside the model, in its :class:`Normalize` front module, whose statistics the checkpoint records.

Classifiers are :class:`SplitClassifier` s: ``forward(x) == forward_head(forward_features(x))`` with
``forward_features`` ending at the Grad-CAM target layer. :class:`SplitModel` and :class:`LinearHead` describe that
split to :mod:`chexseg_dist.saliency.gradcam`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TensorFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LinearHead:
    """Describes a head that is ``[ReLU ->] global average pool -> linear``, for the closed form.

    Attributes:
        linear: the final ``nn.Linear(C, K)``; its weight is ``[K, C]``.
        relu: whether a ReLU sits between the target activation and the global average pool.
    """

    linear: nn.Linear
    relu: bool


@runtime_checkable
class SplitModel(Protocol):
    """A classifier that can be cut at a target layer into ``features`` and ``head`` callables.

    ``split_at_target(name)`` returns ``(features, head)`` with ``head(features(x)) == model(x)`` and
    ``features(x)`` equal to the output of the module called ``name``; or ``None`` if the model cannot split
    there (then :func:`grad_cam` uses the generic hook route). A model may also define
    ``linear_head(name) -> LinearHead | None`` to enable the closed form.
    """

    def split_at_target(self, name: str) -> tuple[TensorFn, TensorFn] | None: ...


#: ImageNet statistics, kept for the 3-channel torchvision backbones so that ImageNet weights would fit unchanged.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)


IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


#: Their channel average, for single-channel models.
GRAY_MEAN: tuple[float, ...] = (0.449,)


GRAY_STD: tuple[float, ...] = (0.226,)


class Normalize(nn.Module):
    """Front module: checks the input contract, normalises and expands 1 -> ``out_channels`` channels.

    Args:
        mean: per-output-channel means (length 1 or ``out_channels``).
        std: per-output-channel standard deviations (length 1 or ``out_channels``), all > 0.
        out_channels: channels the backbone expects (1, or 3 for torchvision backbones).

    Input ``[B, 1, S, S]`` floating point in ``[0, 1]``; output ``[B, out_channels, S, S]`` ``(x - mean) / std``.
    The statistics are non-persistent buffers: the checkpoint's ``normalisation`` field is their one record.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], out_channels: int = 1) -> None:
        super().__init__()
        for field, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, out_channels):
                raise ValueError(f"Normalize: {field} needs 1 or {out_channels} values, got {list(values)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be > 0, got {list(std)}")
        self.out_channels = out_channels
        # Kept as given (float64), so the checkpoint records 0.485, not its float32 rounding.
        self._stats = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"classifier input must be grayscale frames [B, 1, S, S], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"classifier input must be float in [0, 1], got {x.dtype}; divide uint8 frames by 255")
        x = (x - self.mean) / self.std
        if x.shape[1] != self.out_channels:
            x = x.expand(-1, self.out_channels, -1, -1)
        return x

    def extra_repr(self) -> str:
        return f"mean={self._stats['mean']}, std={self._stats['std']}, out_channels={self.out_channels}"

    def statistics(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}`` as recorded in a checkpoint."""
        return {key: list(values) for key, values in self._stats.items()}


class SplitClassifier:
    """Mixin for registered classifiers (combined with ``nn.Module``): ``normalize -> features -> head``.

    Subclasses set ``self.normalize`` (:class:`Normalize`), ``self.num_classes``, ``self.feature_layers`` (the
    dotted module names whose output *is* :meth:`forward_features`' output; the first is the default Grad-CAM
    target) and implement :meth:`forward_features`, :meth:`forward_head` and :meth:`describe_head`.
    Implements :class:`chexseg_dist.saliency.SplitModel`.
    """

    normalize: Normalize
    num_classes: int
    feature_layers: tuple[str, ...]
    in_channels: int = 1

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, K]`` for images ``[B, 1, S, S]`` float in ``[0, 1]``."""
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Activation of the default target layer, ``[B, C, h, w]``."""
        raise NotImplementedError

    def forward_head(self, act: Tensor) -> Tensor:
        """Logits ``[B, K]`` from the target activation. Must not modify ``act`` in place."""
        raise NotImplementedError

    def describe_head(self) -> LinearHead | None:
        """The head as ``[ReLU ->] GAP -> linear`` if it is exactly that, else ``None``."""
        return None

    def split_at_target(self, name: str) -> tuple[TensorFn, TensorFn] | None:
        """``(forward_features, forward_head)`` if ``name`` is the feature output, else ``None``."""
        return (self.forward_features, self.forward_head) if name in self.feature_layers else None

    def linear_head(self, name: str) -> LinearHead | None:
        """The closed-form head description when Grad-CAM targets ``name``."""
        return self.describe_head() if name in self.feature_layers else None


def gap_linear(act: Tensor, linear: nn.Linear, relu: bool) -> Tensor:
    # Not in place: the target activation must stay what hooks on the feature layer saw.
    x = F.relu(act) if relu else act
    return linear(x.mean(dim=(2, 3)))


class FeaturesReluHead(SplitClassifier):
    """A :class:`SplitClassifier` whose backbone is ``self.features`` and whose head is ReLU -> GAP ->
    ``self.classifier`` (DenseNet, tiny_cnn)."""

    features: nn.Module
    classifier: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, act: Tensor) -> Tensor:
        return gap_linear(act, self.classifier, relu=True)

    def describe_head(self) -> LinearHead:
        return LinearHead(self.classifier, relu=True)
