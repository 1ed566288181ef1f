"""Maps -> masks: map maths (upsampling, normalisation), binarisers, gates, :class:`MaskMaker`, the thresholds file,
one-pass threshold tuning on expert masks, and export to CheXlocalize segmentation JSON."""

from chexseg_dist.masks.binarize import Binarizer, OtsuBinarizer, ThresholdBinarizer, create_binarizer, fill_holes
from chexseg_dist.masks.export import export_masks
from chexseg_dist.masks.gating import gate, manifest_labels, task_labels, task_values
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.maps import (
    FRAMES,
    content_window,
    frame_shape,
    is_constant,
    map_argmax,
    map_extrema,
    map_range,
    normalise_maps,
    quantise_maps,
    upsample_maps,
)
from chexseg_dist.masks.thresholds import THRESHOLDS_FORMAT, TunedThresholds
from chexseg_dist.masks.tuning import describe, threshold_counts, threshold_grid, tune

__all__ = [
    "FRAMES",
    "THRESHOLDS_FORMAT",
    "Binarizer",
    "MaskMaker",
    "OtsuBinarizer",
    "ThresholdBinarizer",
    "TunedThresholds",
    "content_window",
    "create_binarizer",
    "describe",
    "export_masks",
    "fill_holes",
    "frame_shape",
    "gate",
    "is_constant",
    "manifest_labels",
    "map_argmax",
    "map_extrema",
    "map_range",
    "normalise_maps",
    "quantise_maps",
    "task_labels",
    "task_values",
    "threshold_counts",
    "threshold_grid",
    "tune",
    "upsample_maps",
]
