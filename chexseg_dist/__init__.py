"""chexseg_dist: distributed pseudo-labelling and semi-supervised segmentation of chest radiographs.

The package is one subpackage per stage, in the order data flows (docs/architecture.md): ``core`` and ``errors``,
``config``, ``data``, ``models``, ``saliency``, ``store``, ``metrics``, ``pseudolabel``, ``masks``, ``train``,
``evaluation``, ``synth`` and ``cli``. Import from the stages; the handful of names below are re-exported lazily
(importing the package imports neither torch nor Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

from chexseg_dist.core import __version__

#: name -> the stage that defines it
_EXPORTS = {
    "ChexsegError": "chexseg_dist.errors",
    "Config": "chexseg_dist.config",
    "load_config": "chexseg_dist.config",
    "Letterbox": "chexseg_dist.core.geometry",
    "TASKS": "chexseg_dist.core.pathologies",
    "OBSERVATIONS": "chexseg_dist.core.pathologies",
    "MapStore": "chexseg_dist.store",
    "MaskMaker": "chexseg_dist.masks",
    "SegmentationEvaluator": "chexseg_dist.metrics",
    "run_pseudolabel": "chexseg_dist.pseudolabel",
    "train_classifier": "chexseg_dist.train",
    "run_evaluation": "chexseg_dist.evaluation",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chexseg_dist' has no attribute {name!r}")
