"""The student's console: the per-epoch line's numbers and the final table of ``chexseg train-segmentation``."""

from __future__ import annotations

from typing import Any

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.train._loop import TrainResult


def effective_ratio(history: list[dict[str, Any]]) -> float:
    """Expert rows over all training rows of a run (every epoch); NaN when it trained on none."""
    e = sum(float(m.get("train_expert_rows", 0.0)) for m in history)
    p = sum(float(m.get("train_pseudo_rows", 0.0)) for m in history)
    return e / (e + p) if e + p else float("nan")


def format_summary(res: TrainResult, mode: str) -> str:
    """The final table: per-pathology output threshold and expert-select mIoU of the best epoch, and wall time."""
    best = res.best_metrics
    width = max(len(t) for t in TASKS)
    lines = [
        "",
        f"Segmentation student ({mode}): best epoch {res.best_epoch + 1} of {len(res.history)} "
        f"(expert-select, {best['select_images']} images, full-mode mIoU in the student's frame)",
        f"  {'pathology':<{width}}  threshold  mIoU full  positives",
    ]
    for task in TASKS:
        iou = best.get(f"select_iou/{task}")
        lines.append(
            f"  {task:<{width}}  {best[f'threshold/{task}']:9.2f}  "
            f"{'     –   ' if iou is None else f'{iou:9.4f}'}  {best[f'select_positives/{task}']:9d}"
        )
    lines.append(f"  {'mean (pathologies with a positive)':<{width}}  {'':9s}  {best['select_miou_full']:9.4f}")
    share = effective_ratio(res.history)
    if mode == "semi":
        lines.append(f"Effective expert share {share:.4f} over {len(res.history)} epoch(s).")
    return "\n".join([*lines, *res.footer()])
