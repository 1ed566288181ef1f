"""Segmentation models (CheXseg's student) and their checkpoint format.

DeepLabV3+ (the paper's), U-Net and FPN from segmentation-models-pytorch, with ResNet-18/34/50 encoders, behind the
classifiers' input contract: images ``[B, 1, S, S]`` float in ``[0, 1]`` (the letterboxed frame) go through a
:class:`~chexseg_dist.models._base.Normalize` front (ImageNet statistics, expanded to 3 channels, as the torchvision
classifiers); outputs are logits ``[B, 10, S, S]`` in TASKS order, 10 independent sigmoids (masks overlap).

Weights are never downloaded: every model is built with ``encoder_weights=None`` (segmentation-models-pytorch's
default would fetch ImageNet weights from a model hub). ``encoder_init`` instead copies the backbone of one of our
own classifier checkpoints of the same torchvision ResNet.

A checkpoint is a directory: ``model.pt`` (the state dict), then ``segmentation.json`` written last (format, arch,
encoder, image_size, tasks, normalisation, the per-pathology output thresholds chosen on expert-select, the selection
metrics, the resolved config and the weights' fingerprint).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.core.registry import SEGMENTATION_ARCHS, SEGMENTATION_ENCODERS
from chexseg_dist.errors import CheckpointError
from chexseg_dist.models._base import IMAGENET_MEAN, IMAGENET_STD, Normalize
from chexseg_dist.models.checkpoint import load_strict, read_json_meta, read_weights, unwrap, write_checkpoint_dir

SEGMENTATION_FORMAT = "chexseg-segmentation"
SEGMENTATION_FORMAT_VERSION = 1
SEGMENTATION_META = "segmentation.json"
SEGMENTATION_WEIGHTS = "model.pt"


def _smp() -> Any:
    import segmentation_models_pytorch as smp  # imported on first use: it pulls in timm

    return smp


def deeplabv3plus(encoder: str, num_classes: int) -> nn.Module:
    """DeepLabV3+ (output stride 16, ASPP), the paper's student."""
    return _smp().DeepLabV3Plus(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)


def unet(encoder: str, num_classes: int) -> nn.Module:
    """U-Net with a ResNet encoder."""
    return _smp().Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)


def fpn(encoder: str, num_classes: int) -> nn.Module:
    """Feature Pyramid Network with a ResNet encoder."""
    return _smp().FPN(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)


class SegmentationModel(nn.Module):
    """A segmentation network behind the normalising front.

    Args:
        arch: a name from :data:`~chexseg_dist.core.registry.SEGMENTATION_ARCHS`.
        encoder: a name from :data:`~chexseg_dist.core.registry.SEGMENTATION_ENCODERS`.
        num_classes: output channels (the 10 TASKS).
        mean, std: normalisation (ImageNet statistics by default, as the torchvision classifiers).
    """

    def __init__(
        self,
        arch: str,
        encoder: str,
        num_classes: int = N_TASKS,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        SEGMENTATION_ENCODERS.check(encoder, "segmentation.encoder")
        self.arch, self.encoder_name, self.num_classes = arch, encoder, num_classes
        self.normalize = Normalize(mean, std, out_channels=3)
        self.net = SEGMENTATION_ARCHS.get(arch, "segmentation.arch")(encoder, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes, S, S]`` for frames ``[B, 1, S, S]`` float in ``[0, 1]`` (S a multiple of 32)."""
        return self.net(self.normalize(x))


def create_segmentation(arch: str, encoder: str, num_classes: int = N_TASKS, **kw: Any) -> SegmentationModel:
    """Build a segmentation model with random weights (never downloads anything)."""
    return SegmentationModel(arch, encoder, num_classes, **kw)


def init_encoder_from_classifier(model: SegmentationModel, checkpoint: str) -> None:
    """Copy a classifier checkpoint's backbone into the model's encoder (``segmentation.encoder_init``).

    The classifier must be the same torchvision ResNet as the encoder; its normalisation replaces the student's,
    so the copied filters see the inputs they were trained on.

    Raises:
        CheckpointError: another architecture (naming both), or weights that do not fit.
    """
    from chexseg_dist.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    if loaded.meta["arch"] != model.encoder_name:
        raise CheckpointError(
            f"segmentation.encoder_init={checkpoint}: a {loaded.meta['arch']} classifier cannot initialise a "
            f"{model.encoder_name} encoder; train a {model.encoder_name} classifier or choose "
            f"segmentation.encoder={loaded.meta['arch']}"
        )
    backbone = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("fc.")}
    # nn.Module's own method: smp's encoders override load_state_dict and drop its report of missing keys.
    missing, unexpected = nn.Module.load_state_dict(model.net.encoder, backbone, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"segmentation.encoder_init={checkpoint}: the backbone does not fit the {model.encoder_name} encoder "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    norm = loaded.meta["normalisation"]
    model.normalize = Normalize(norm["mean"], norm["std"], out_channels=3)


@dataclass
class LoadedSegmentation:
    """A segmentation checkpoint ready to predict.

    Attributes:
        model: the model, in eval mode.
        meta: the parsed ``segmentation.json``.
        thresholds: ``[10]`` float64 output thresholds on the sigmoid (TASKS order).
        path: the checkpoint directory.
    """

    model: SegmentationModel
    meta: dict[str, Any]
    thresholds: np.ndarray
    path: str
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])


def save_segmentation(
    path: str,
    model: nn.Module,
    *,
    image_size: int,
    thresholds: Sequence[float] | np.ndarray,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write ``model.pt`` then ``segmentation.json`` into the directory ``path`` (local or URI).

    Raises:
        CheckpointError: thresholds that are not 10 numbers in [0, 1], or metadata that is not JSON-serialisable.
    """
    bare = unwrap(model)
    if not isinstance(bare, SegmentationModel):
        raise TypeError(f"save_segmentation: expected a SegmentationModel, got {type(bare).__name__}")
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (N_TASKS,) or not np.all((t >= 0) & (t <= 1)):
        raise CheckpointError(f"save_segmentation {path}: expected {N_TASKS} thresholds in [0, 1], got {t.tolist()}")
    meta = {
        "format": SEGMENTATION_FORMAT,
        "format_version": SEGMENTATION_FORMAT_VERSION,
        "arch": bare.arch,
        "encoder": bare.encoder_name,
        "image_size": int(image_size),
        "tasks": list(TASKS),
        "normalisation": bare.normalize.statistics(),
        "thresholds": {task: float(v) for task, v in zip(TASKS, t)},
        "metrics": metrics,
        "config": config,
    }
    return write_checkpoint_dir(path, bare, meta, SEGMENTATION_META, SEGMENTATION_WEIGHTS)


def read_segmentation_meta(path: str) -> dict[str, Any]:
    """Parse and check ``<path>/segmentation.json`` (no weights loaded).

    Raises:
        CheckpointError: missing or invalid file, another format or version, unknown arch or encoder, other tasks.
    """
    meta = read_json_meta(path, SEGMENTATION_META, "a segmentation checkpoint (chexseg train-segmentation)")
    where = f"checkpoint {path}/{SEGMENTATION_META}"
    if meta.get("format") != SEGMENTATION_FORMAT or meta.get("format_version") != SEGMENTATION_FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this version reads "
            f"{SEGMENTATION_FORMAT!r} version {SEGMENTATION_FORMAT_VERSION}"
        )
    for key in ("arch", "encoder", "image_size", "tasks", "normalisation", "thresholds", "fingerprint"):
        if key not in meta:
            raise CheckpointError(f"{where}: missing field {key!r}")
    if meta["arch"] not in SEGMENTATION_ARCHS or meta["encoder"] not in SEGMENTATION_ENCODERS:
        raise CheckpointError(f"{where}: unknown arch {meta['arch']!r} or encoder {meta['encoder']!r}")
    if list(meta["tasks"]) != list(TASKS):
        raise CheckpointError(f"{where}: field tasks {meta['tasks']} differs from {list(TASKS)}")
    return meta


def load_segmentation(path: str, device: str | torch.device = "cpu") -> LoadedSegmentation:
    """Load a segmentation checkpoint directory (weights checked against their fingerprint).

    Raises:
        CheckpointError: naming the path and the field or file that is wrong.
    """
    meta = read_segmentation_meta(path)
    state = read_weights(path, SEGMENTATION_WEIGHTS, meta["fingerprint"])
    norm = meta["normalisation"]
    model = create_segmentation(meta["arch"], meta["encoder"], mean=norm["mean"], std=norm["std"])
    load_strict(model, state, f"checkpoint {path}: the weights do not fit {meta['arch']}/{meta['encoder']}")
    model.to(device).eval()
    thresholds = np.asarray([meta["thresholds"][t] for t in TASKS], dtype=np.float64)
    return LoadedSegmentation(model, meta, thresholds, path, fingerprint=meta["fingerprint"])


def autocast(device: torch.device, amp: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on a GPU when ``amp``; nothing on a CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def predict_probs(model: nn.Module, frames: np.ndarray, batch_size: int, device: torch.device, amp: bool) -> np.ndarray:
    """``[n, 10, S, S]`` float32 sigmoid outputs of the model for uint8 frames ``[n, S, S]`` (eval mode, no grad)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(frames), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[start : start + batch_size])).to(device)
            x = x.unsqueeze(1).float().div_(255.0)
            with autocast(device, amp):
                logits = model(x)
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, N_TASKS, 1, 1), dtype=np.float32)
