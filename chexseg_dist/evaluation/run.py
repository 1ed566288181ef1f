"""The evaluate stage: score a CheXlocalize prediction file against ground truth and write the report.

``chexseg evaluate`` is a thin command over :func:`run_evaluation`, which tests and other stages (the student's
experiment) import. The numbers come from the one implementation in :mod:`chexseg_dist.metrics.segmentation`.

Outputs in the report folder: ``summary.json`` (the numbers), ``per_image.csv`` (one line per image and pathology),
``report.md`` with ``miou.png`` (per-pathology mIoU with CIs), and ``config.yaml``.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from chexseg_dist.config import Config, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.core.serialize import json_safe
from chexseg_dist.evaluation.pointing import hit_stats
from chexseg_dist.evaluation.report import read_reference, write_report
from chexseg_dist.metrics.segmentation import EvaluationResult, check_mode, evaluate_stats, pair_stats

SUMMARY_JSON = "summary.json"
PER_IMAGE_CSV = "per_image.csv"


def evaluate_files(
    gt_path: str,
    pred_path: str,
    mode: str = "tp_only",
    n_bootstrap: int = 1000,
    seed: int = 0,
    maps: str | None = None,
    allow_missing: bool = False,
) -> EvaluationResult:
    """Evaluate a CheXlocalize prediction JSON against a ground-truth JSON (see the module conventions).

    Args:
        gt_path, pred_path: segmentation JSON files (local or URI).
        mode: ``tp_only`` or ``full``.
        n_bootstrap, seed: bootstrap resamples over images and their seed.
        maps: optional map store for the hit rate.
        allow_missing: score images/pathologies missing from the predictions as empty masks (warns).
    """
    from chexseg_dist.data.chexlocalize import read_segmentations

    check_mode(mode)
    gt = read_segmentations(gt_path)
    pred = read_segmentations(pred_path)
    stats = pair_stats(gt, pred, allow_missing=allow_missing, gt_source=gt_path, pred_source=pred_path)
    hits = hit_stats(maps, gt, stats.image_ids) if maps else None
    result = evaluate_stats(stats, mode, n_bootstrap, seed, hits)
    result.extra_pred_images = len(set(pred) - set(gt))
    return result


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` produced: the result, the summary it wrote, where, and the warnings it met."""

    result: EvaluationResult
    summary: dict[str, Any]
    report: str
    notes: list[str]
    seconds: float


def run_evaluation(
    cfg: Config,
    gt: str,
    pred: str,
    out: str,
    *,
    maps: str | None = None,
    radiologist: str | None = None,
    reference: str | None = None,
    command: str = "",
) -> EvaluationRun:
    """Evaluate ``pred`` against ``gt`` under ``cfg.evaluate`` and write the report folder ``out``.

    Args:
        cfg: the resolved config (``evaluate`` section: mode, bootstrap, missing predictions; saved beside).
        gt, pred: CheXlocalize segmentation JSON files (local or URI).
        out: the report folder.
        maps: a map store of the same images, for the hit rate.
        radiologist: a radiologist segmentation JSON evaluated the same way and drawn beside the model.
        reference: a ``{pathology: miou}`` JSON of fixed reference values.
        command: the command line, recorded in the report.
    """
    ev = cfg.evaluate
    mode = "full" if ev.full else "tp_only"
    ref = read_reference(reference) if reference else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = evaluate_files(gt, pred, mode, ev.n_bootstrap, ev.seed, maps, ev.allow_missing)
        rad = (
            evaluate_files(gt, radiologist, mode, ev.n_bootstrap, ev.seed, None, ev.allow_missing)
            if radiologist
            else None
        )
    notes = [str(w.message) for w in caught]
    seconds = time.perf_counter() - t0
    fsio.makedirs(out)
    summary = result.summary()
    if rad is not None:
        rs = rad.summary()
        summary["radiologist"] = {"source": radiologist, "pathologies": rs["pathologies"], "mean_miou": rs["mean_miou"]}
    if ref is not None:
        summary["reference"] = {"source": reference, "pathologies": ref}
    with fsio.open_file(fsio.join(out, SUMMARY_JSON), "w") as f:
        json.dump(json_safe(summary), f, indent=2)
    write_per_image_csv(fsio.join(out, PER_IMAGE_CSV), result)
    inputs: Mapping[str, str | None] = {
        "ground truth": gt,
        "predictions": pred,
        "map store (hit rate)": maps,
        "radiologist segmentations": radiologist,
        "reference values": reference,
    }
    report = write_report(out, result, command, inputs, rad, ref, notes)
    save_config(cfg, out, extra={"command": command, "inputs": dict(inputs), "seconds": round(seconds, 2)})
    return EvaluationRun(result=result, summary=summary, report=report, notes=notes, seconds=seconds)


def write_per_image_csv(path: str, result: EvaluationResult) -> None:
    """``per_image.csv``: image_id, pathology, gt_area, pred_area, intersection, union, iou, kept (+ hit).

    ``iou`` is empty for both-empty pairs; ``hit`` (with a map store) is empty where the ground truth is empty.
    """
    s = result.stats
    iou, kept, union = s.iou(), s.kept(result.mode), s.union
    header = ["image_id", "pathology", "gt_area", "pred_area", "intersection", "union", "iou", "kept"]
    if result.hits is not None:
        header.append("hit")
    with fsio.open_file(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, image_id in enumerate(s.image_ids):
            for k, task in enumerate(TASKS):
                row: list[Any] = [
                    image_id,
                    task,
                    int(s.gt_area[i, k]),
                    int(s.pred_area[i, k]),
                    int(s.inter[i, k]),
                    int(union[i, k]),
                    "" if not np.isfinite(iou[i, k]) else f"{iou[i, k]:.6f}",
                    int(kept[i, k]),
                ]
                if result.hits is not None:
                    row.append(int(result.hits.hit[i, k]) if result.hits.valid[i, k] else "")
                writer.writerow(row)
