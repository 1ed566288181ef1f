"""Classifier architectures: a registry, a factory, one input contract and the split Grad-CAM needs.

Input contract, the same for every architecture and every stage (training, pseudo-labelling, evaluation): images
``[B, 1, S, S]`` float32 in ``[0, 1]``, the grayscale letterboxed frame (a uint8 frame from the pipeline is divided
by 255 first). Normalisation (mean/std) and the expansion to 3 channels that torchvision backbones expect happen
inside the model, in its :class:`Normalize` front module, and the checkpoint records them.

Every registered model is a :class:`SplitClassifier`: ``forward(x) == forward_head(forward_features(x))`` where
``forward_features`` ends at the Grad-CAM target layer (the last feature block) and ``forward_head`` is the rest.
That lets :func:`chexseg_dist.saliency.gradcam.grad_cam` run the backbone once, and, because every registered head is
``[ReLU ->] global average pool -> linear``, compute all classes' maps in closed form.

Usage::

    model = create_classifier("densenet121", num_classes=14)
    layer = default_target_layer("densenet121")  # "features"

No weights are ever downloaded: torchvision backbones are built with random initialisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.core.registry import CLASSIFIER_ARCHS
from chexseg_dist.models.tiny import TinyCNN

ArchBuilder = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ArchBuilder)


def _with_target(target_layer: str) -> Callable[[_F], _F]:
    """Record a builder's default Grad-CAM target layer (dotted module name) on the builder itself."""

    def wrap(builder: _F) -> _F:
        builder.target_layer = target_layer  # type: ignore[attr-defined]
        return builder

    return wrap


def register_arch(target_layer: str) -> Callable[[_F], _F]:
    """Decorator registering a plug-in ``builder(num_classes: int, **kw) -> nn.Module`` under its function name.

    The built-in architectures are listed in :data:`~chexseg_dist.core.registry.CLASSIFIER_ARCHS`.

    Args:
        target_layer: dotted name of the module whose output is the default Grad-CAM target.

    Raises:
        ValueError: an architecture of that name is already registered.
    """

    def wrap(builder: _F) -> _F:
        return CLASSIFIER_ARCHS.add(builder.__name__, _with_target(target_layer)(builder))  # type: ignore[return-value]

    return wrap


def unregister_arch(name: str) -> None:
    """Remove an architecture from the registry (for tests and plug-ins); unknown names are ignored."""
    CLASSIFIER_ARCHS.remove(name)


def list_archs() -> list[str]:
    """Registered architecture names, sorted."""
    return CLASSIFIER_ARCHS.names()


def _builder(arch: str) -> ArchBuilder:
    return CLASSIFIER_ARCHS.get(arch, "classifier.arch")


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
        ConfigError: unknown ``arch`` (listing the registered ones).
        ValueError: ``num_classes < 1``.
    """
    builder = _builder(arch)
    if num_classes < 1:
        raise ValueError(f"create_classifier({arch!r}): num_classes must be >= 1, got {num_classes}")
    model = builder(num_classes=num_classes, **kw)
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
    return str(_builder(arch).target_layer)  # type: ignore[attr-defined]


@_with_target("features")
def densenet121(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """DenseNet121 (growth 32, blocks 6-12-24-16); the paper's classifier. Grid ``S / 32`` (10 x 10 at 320 px)."""
    from chexseg_dist.models.backbones import DenseNetClassifier

    return DenseNetClassifier(num_classes, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, **kw)


@_with_target("layer4")
def resnet18(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """ResNet-18. Grid ``S / 32``."""
    from chexseg_dist.models.backbones import BasicBlock, ResNetClassifier

    return ResNetClassifier(num_classes, BasicBlock, [2, 2, 2, 2], **kw)


@_with_target("layer4")
def resnet50(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """ResNet-50. Grid ``S / 32``."""
    from chexseg_dist.models.backbones import Bottleneck, ResNetClassifier

    return ResNetClassifier(num_classes, Bottleneck, [3, 4, 6, 3], **kw)


@_with_target("features")
def tiny_cnn(num_classes: int = len(OBSERVATIONS), **kw: Any) -> nn.Module:
    """:class:`TinyCNN`; the default for the ``tiny`` preset (2 CPU cores, 128 px). Grid ``S / 2**len(widths)``."""
    return TinyCNN(num_classes, **kw)
