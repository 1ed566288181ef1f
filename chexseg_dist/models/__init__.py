"""Models: the input contract, the classifier registry and its architectures, and the checkpoint format.

Usage::

    model = create_classifier("densenet121", num_classes=14)
    layer = default_target_layer("densenet121")  # "features"

No weights are ever downloaded: torchvision backbones are built with random initialisation.
"""

from chexseg_dist.models._base import LinearHead, Normalize, SplitClassifier, SplitModel, TensorFn
from chexseg_dist.models.checkpoint import (
    LoadedClassifier,
    ensemble_fingerprint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    split_paths,
    weights_fingerprint,
)
from chexseg_dist.models.classifiers import (
    create_classifier,
    default_target_layer,
    list_archs,
    register_arch,
    unregister_arch,
)
from chexseg_dist.models.tiny import TinyCNN

__all__ = [
    "LinearHead",
    "LoadedClassifier",
    "Normalize",
    "SplitClassifier",
    "SplitModel",
    "TensorFn",
    "TinyCNN",
    "create_classifier",
    "default_target_layer",
    "ensemble_fingerprint",
    "list_archs",
    "load_checkpoint",
    "read_meta",
    "register_arch",
    "save_checkpoint",
    "split_paths",
    "unregister_arch",
    "weights_fingerprint",
]
