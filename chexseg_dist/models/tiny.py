"""A small, fast CNN classifier for CPU tests and demos (the tiny preset)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.models._base import GRAY_MEAN, GRAY_STD, FeaturesReluHead, Normalize


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
