"""Evaluation: the evaluate stage (CheXlocalize mIoU, dataset IoU, hit rate, bootstrap CIs), its report and chart,
and overlays of maps and masks on the radiographs."""

from chexseg_dist.evaluation.overlay import render_overlay, write_overlays
from chexseg_dist.evaluation.pointing import hit_stats, point_in_rle
from chexseg_dist.evaluation.report import read_reference, render_report, write_report
from chexseg_dist.evaluation.run import EvaluationRun, evaluate_files, run_evaluation, write_per_image_csv

__all__ = [
    "EvaluationRun",
    "evaluate_files",
    "hit_stats",
    "point_in_rle",
    "read_reference",
    "render_overlay",
    "render_report",
    "run_evaluation",
    "write_overlays",
    "write_per_image_csv",
    "write_report",
]
