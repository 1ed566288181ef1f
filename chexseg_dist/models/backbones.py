"""The torchvision backbones (DenseNet, ResNet) as :class:`~chexseg_dist.models.SplitClassifier` models.

Kept apart from :mod:`chexseg_dist.models` so that importing the package, or using ``tiny_cnn``, never imports
torchvision (about 1.2 s per process: every Ray worker that builds a model pays it). The builders in
:mod:`chexseg_dist.models` import this module on first use; checkpoints hold state dicts, not pickled classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.models import DenseNet, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from chexseg_dist.models._base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeaturesReluHead,
    LinearHead,
    Normalize,
    SplitClassifier,
    gap_linear,
)

__all__ = ["BasicBlock", "Bottleneck", "DenseNetClassifier", "ResNetClassifier"]


class DenseNetClassifier(FeaturesReluHead, DenseNet):
    """torchvision DenseNet (same module names and state-dict keys) behind a :class:`Normalize` front.

    torchvision's ``DenseNet.forward`` applies ``F.relu(features, inplace=True)`` to the output of ``features``,
    so a forward hook there would see its tensor rectified after the fact and Grad-CAM would use the wrong ``A``.
    Here the head's ReLU is out of place: the activation at ``features`` (after ``norm5``) stays intact.
    """

    def __init__(
        self,
        num_classes: int,
        growth_rate: int,
        block_config: tuple[int, int, int, int],
        num_init_features: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        DenseNet.__init__(
            self,
            growth_rate=growth_rate,
            block_config=block_config,
            num_init_features=num_init_features,
            num_classes=num_classes,
        )
        self.normalize = Normalize(mean, std, out_channels=3)
        self.num_classes = num_classes
        self.feature_layers = ("features", "features.norm5")


class ResNetClassifier(SplitClassifier, ResNet):
    """torchvision ResNet (same module names and state-dict keys) behind a :class:`Normalize` front.

    ``layer4`` ends in a ReLU, so the head is GAP -> linear without a ReLU of its own.
    """

    def __init__(
        self,
        num_classes: int,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        ResNet.__init__(self, block, layers, num_classes=num_classes)
        self.normalize = Normalize(mean, std, out_channels=3)
        self.num_classes = num_classes
        self.feature_layers = ("layer4",)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, act: Tensor) -> Tensor:
        return gap_linear(act, self.fc, relu=False)

    def describe_head(self) -> LinearHead:
        return LinearHead(self.fc, relu=False)
