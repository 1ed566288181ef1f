"""Classifier architectures: a registry, a factory, one input contract and the split Grad-CAM needs.

Input contract, the same for every architecture and every stage (training, pseudo-labelling, evaluation): images
``[B, 1, S, S]`` float32 in ``[0, 1]``, the grayscale letterboxed frame (a uint8 frame from the pipeline is divided
by 255 first). Normalisation (mean/std) and the expansion to 3 channels that torchvision backbones expect happen
inside the model, in its :class:`Normalize` front module, and the checkpoint records them.

Every registered model is a :class:`SplitClassifier`: ``forward(x) == forward_head(forward_features(x))`` where
``forward_features`` ends at the Grad-CAM target layer (the last feature block) and ``forward_head`` is the rest.
That lets :func:`chexseg_dist.saliency.grad_cam` run the backbone once, and, because every registered head is
``[ReLU ->] global average pool -> linear``, compute all classes' maps in closed form.

Usage::

    model = create_classifier("densenet121", num_classes=14)
    layer = default_target_layer("densenet121")  # "features"

No weights are ever downloaded: torchvision backbones are built with random initialisation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexseg_dist.pathologies import OBSERVATIONS
from chexseg_dist.saliency import LinearHead, TensorFn

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
        return self.features(self.normalize(x))  # type: ignore[no-any-return]

    def forward_head(self, act: Tensor) -> Tensor:
        return gap_linear(act, self.classifier, relu=True)

    def describe_head(self) -> LinearHead:
        return LinearHead(self.classifier, relu=True)


class TinyCNN(FeaturesReluHead, nn.Module):
    """A small, fast CNN for CPU tests and demos.

    ``len(widths)`` stages, each ``conv3x3/2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU`` (the last stage stops before
    its final ReLU, as DenseNet's ``norm5`` does), then ``ReLU -> global average pool -> linear``. With the default
    widths ``(16, 32, 64, 128)`` the saliency grid is ``S / 16`` (8 x 8 at 128 px) and a forward pass costs about
    60 million multiply-adds per 128 px image. Default Grad-CAM target: ``features``, i.e. the output of the last
    stage (``features.stage<n>`` names the same tensor).
    """

    def __init__(
        self,
        num_classes: int = len(OBSERVATIONS),
        widths: Sequence[int] = (16, 32, 64, 128),
        mean: Sequence[float] = GRAY_MEAN,
        std: Sequence[float] = GRAY_STD,
    ) -> None:
        nn.Module.__init__(self)
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"tiny_cnn: widths must be a non-empty list of positive ints, got {list(widths)}")
        self.normalize = Normalize(mean, std, out_channels=1)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels = 1
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            layers: list[nn.Module] = [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
            ]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            stages[f"stage{i + 1}"] = nn.Sequential(*layers)
            channels = int(width)
        self.features = nn.Sequential(stages)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_classes = num_classes
        self.feature_layers = ("features", f"features.stage{len(widths)}")


# ---------------------------------------------------------------------------------------------------- registry

ArchBuilder = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ArchBuilder)


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: its builder and its default Grad-CAM target layer (dotted module name)."""

    name: str
    builder: ArchBuilder
    target_layer: str


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(target_layer: str) -> Callable[[_F], _F]:
    """Decorator registering ``builder(num_classes: int, **kw) -> nn.Module`` under its function name.

    Args:
        target_layer: dotted name of the module whose output is the default Grad-CAM target.

    Raises:
        ValueError: an architecture of that name is already registered.
    """

    def wrap(builder: _F) -> _F:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchSpec(name, builder, target_layer)
        return builder

    return wrap


def unregister_arch(name: str) -> None:
    """Remove an architecture from the registry (for tests and plug-ins); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def list_archs() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def _spec(arch: str) -> ArchSpec:
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {list_archs()}") from None


def create_classifier(arch: str, num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """Build a registered classifier with random weights (never downloads anything).

    Args:
        arch: a name from :func:`list_archs`.
        num_classes: outputs ``K`` (14 CheXpert observations by default).
        **kw: architecture options, e.g. ``mean``/``std`` (normalisation) or ``widths`` (tiny_cnn).

    Returns:
        An ``nn.Module`` taking ``[B, 1, S, S]`` float32 in ``[0, 1]`` and returning logits ``[B, K]``; it carries
        ``arch`` and ``arch_kwargs`` (the options other than mean/std) so a checkpoint can rebuild it.

    Raises:
        ValueError: unknown ``arch`` (listing the registered ones) or ``num_classes < 1``.
    """
    spec = _spec(arch)
    if num_classes < 1:
        raise ValueError(f"create_classifier({arch!r}): num_classes must be >= 1, got {num_classes}")
    model = spec.builder(num_classes=num_classes, **kw)
    # Plain attributes (not submodules): what a checkpoint needs to rebuild the model. (nn.Module's attribute
    # typing only knows tensors and modules, hence the ignores.)
    model.arch = arch  # type: ignore[assignment]
    model.arch_kwargs = {k: v for k, v in kw.items() if k not in ("mean", "std")}  # type: ignore[assignment]
    return model


def default_target_layer(arch: str) -> str:
    """Dotted module name of ``arch``'s last feature block (the default Grad-CAM target).

    DenseNet121: ``"features"`` (after ``norm5``, i.e. the last dense block's output, normalised); ResNet:
    ``"layer4"``; tiny_cnn: ``"features"`` (the output of its last stage, whatever the number of stages).
    """
    return _spec(arch).target_layer


@register_arch(target_layer="features")
def densenet121(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """DenseNet121 (growth 32, blocks 6-12-24-16); the paper's classifier. Grid ``S / 32`` (10 x 10 at 320 px)."""
    from chexseg_dist.backbones import DenseNetClassifier

    return DenseNetClassifier(num_classes, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, **kw)


@register_arch(target_layer="layer4")
def resnet18(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """ResNet-18. Grid ``S / 32``."""
    from chexseg_dist.backbones import BasicBlock, ResNetClassifier

    return ResNetClassifier(num_classes, BasicBlock, [2, 2, 2, 2], **kw)


@register_arch(target_layer="layer4")
def resnet50(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """ResNet-50. Grid ``S / 32``."""
    from chexseg_dist.backbones import Bottleneck, ResNetClassifier

    return ResNetClassifier(num_classes, Bottleneck, [3, 4, 6, 3], **kw)


@register_arch(target_layer="features")
def tiny_cnn(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """:class:`TinyCNN`; the default for the ``tiny`` preset (2 CPU cores, 128 px). Grid ``S / 2**len(widths)``."""
    return TinyCNN(num_classes, **kw)
