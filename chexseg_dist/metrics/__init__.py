"""Metrics as a library under both training and evaluation: summable segmentation statistics, bootstrap CIs, AUROC."""

from chexseg_dist.metrics.auroc import auroc, mean_task_auroc, per_class_auroc, task_aurocs
from chexseg_dist.metrics.bootstrap import Metric, bootstrap_counts, percentile_ci, ratio, ratio_metric
from chexseg_dist.metrics.segmentation import (
    MODES,
    EvaluationResult,
    HitStats,
    MissingPredictionsError,
    PairStats,
    SegmentationEvaluator,
    check_mode,
    dense_pair_stats,
    evaluate_stats,
    pair_stats,
    rle_areas,
)

__all__ = [
    "MODES",
    "EvaluationResult",
    "HitStats",
    "Metric",
    "MissingPredictionsError",
    "PairStats",
    "SegmentationEvaluator",
    "auroc",
    "bootstrap_counts",
    "check_mode",
    "dense_pair_stats",
    "evaluate_stats",
    "mean_task_auroc",
    "pair_stats",
    "per_class_auroc",
    "percentile_ci",
    "ratio",
    "ratio_metric",
    "rle_areas",
    "task_aurocs",
]
