"""Pseudo-labelling: a Ray Data job that streams a manifest's radiographs through classifier actors computing
probabilities and all-class Grad-CAM maps, into a map store written through the store's writer."""

from chexseg_dist.pseudolabel.inputs import checkpoint_identity, manifest_fingerprint, probe_grid_shape, select_images
from chexseg_dist.pseudolabel.job import build_dataset, resource_problem, run_pseudolabel
from chexseg_dist.pseudolabel.predictor import ClassifierPredictor
from chexseg_dist.pseudolabel.summary import (
    PseudolabelSummary,
    main_summary,
    operator_busy_seconds,
    pipeline_operators,
)

__all__ = [
    "ClassifierPredictor",
    "PseudolabelSummary",
    "build_dataset",
    "checkpoint_identity",
    "main_summary",
    "manifest_fingerprint",
    "operator_busy_seconds",
    "pipeline_operators",
    "probe_grid_shape",
    "resource_problem",
    "run_pseudolabel",
    "select_images",
]
