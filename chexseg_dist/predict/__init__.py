"""Prediction with a trained student: a Ray Data job writing CheXlocalize segmentation JSON (``chexseg segment``)."""

from chexseg_dist.predict.job import SegmentSummary, build_dataset, encode_predictions, run_segment
from chexseg_dist.predict.predictor import SegmentationPredictor

__all__ = ["SegmentSummary", "SegmentationPredictor", "build_dataset", "encode_predictions", "run_segment"]
