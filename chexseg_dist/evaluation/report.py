"""The human-readable side of ``chexseg evaluate``: ``report.md`` and a per-pathology mIoU bar chart.

The chart shows the model's mIoU per pathology with its 95% bootstrap CI; radiologist values, when given, are
drawn beside each bar (a second bar with its CI for a radiologist segmentation file evaluated the same way, or a
marker for fixed reference values read from a ``{pathology: miou}`` JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from chexseg_dist.core.pathologies import TASKS, UnknownPathologyError, canonical_task
from chexseg_dist.errors import InputError
from chexseg_dist.metrics.segmentation import EvaluationResult

CHART_FILENAME = "miou.png"
REPORT_FILENAME = "report.md"


def read_reference(path: str) -> dict[str, float]:
    """Fixed reference mIoU values ``{pathology: miou}`` (e.g. published radiologist numbers).

    Raises:
        InputError: naming the file and the entry that is not a pathology name with a number in [0, 1].
    """
    from chexseg_dist.core.fsio import read_input

    try:
        data = json.loads(read_input(path, "reference file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object {{pathology: miou}}")
    out: dict[str, float] = {}
    for key, value in data.items():
        try:
            name = canonical_task(key)
        except UnknownPathologyError as exc:
            raise InputError(f"{path}: {exc}") from None
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise InputError(f"{path}: value for {key!r} must be a number in [0, 1], got {value!r}")
        out[name] = float(value)
    return out


def plot_miou(
    path: str,
    result: EvaluationResult,
    radiologist: EvaluationResult | None = None,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
) -> None:
    """Bar chart of per-pathology mIoU with 95% CI error bars (matplotlib, Agg), written as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(TASKS))
    width = 0.38 if radiologist is not None else 0.6
    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    try:
        _bars(ax, x - (width / 2 if radiologist is not None else 0), width, result, "model", "#3b75af")
        if radiologist is not None:
            _bars(ax, x + width / 2, width, radiologist, "radiologist", "#e0883a")
        if reference:
            ref = np.array([reference.get(t, np.nan) for t in TASKS])
            ax.scatter(x, ref, marker="D", color="black", zorder=5, label="reference", s=28)
        for k in np.flatnonzero(~np.isfinite(result.miou.value)):
            ax.text(x[k], 0.01, "n=0", ha="center", va="bottom", fontsize=8, color="gray")
        ax.set_xticks(x)
        ax.set_xticklabels([t.replace(" ", "\n", 1) for t in TASKS], fontsize=8)
        ax.set_ylabel("mIoU")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        mode = "true positives only" if result.mode == "tp_only" else "full dataset"
        ax.set_title(title or f"mIoU per pathology ({mode}), 95% bootstrap CI")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        from chexseg_dist.core.fsio import open_file

        with open_file(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def _bars(ax: Any, x: np.ndarray, width: float, result: EvaluationResult, label: str, color: str) -> None:
    value = result.miou.value
    ci = result.miou.ci
    ok = np.isfinite(value)
    lo = np.where(np.isfinite(ci[:, 0]), value - ci[:, 0], 0.0)
    hi = np.where(np.isfinite(ci[:, 1]), ci[:, 1] - value, 0.0)
    ax.bar(
        x[ok],
        value[ok],
        width,
        yerr=np.stack([np.clip(lo[ok], 0, None), np.clip(hi[ok], 0, None)]),
        capsize=3,
        color=color,
        label=label,
        error_kw={"elinewidth": 1},
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(ci: np.ndarray) -> str:
    return "–" if not np.all(np.isfinite(ci)) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render_report(
    result: EvaluationResult,
    command: str,
    inputs: Mapping[str, str | None],
    chart: str | None = CHART_FILENAME,
    radiologist: EvaluationResult | None = None,
    reference: Mapping[str, float] | None = None,
    warnings_: list[str] | None = None,
) -> str:
    """The Markdown report: mode, command, table (mIoU, CI, n, dataset-level IoU, hit rate), exclusions, notes."""
    mode_text = (
        "**true positives only** (`tp_only`): an (image, pathology) pair counts when both the ground truth and the "
        "prediction are non-empty"
        if result.mode == "tp_only"
        else "**full** (`full`): pairs where exactly one of ground truth and prediction is empty count with IoU 0"
    )
    lines = [
        "# Localisation evaluation (CheXlocalize conventions)",
        "",
        f"Command: `{command}`",
        "",
    ]
    for key, value in inputs.items():
        if value:
            lines.append(f"- {key}: `{value}`")
    lines += [
        "",
        f"Mode: {mode_text}. Pairs where both are empty never count.",
        "",
        f"Images: {len(result.stats.image_ids)}. 95% CIs: percentile bootstrap over images, {result.n_bootstrap} "
        f"resamples, seed {result.seed}; values are point estimates on the full set.",
        "",
    ]
    if chart:
        lines += [f"![mIoU per pathology]({chart})", ""]
    header = ["Pathology", "mIoU", "95% CI", "n (kept pairs)", "dataset-level IoU", "dataset IoU 95% CI"]
    if result.hit_rate is not None:
        header += ["hit rate", "hit-rate 95% CI", "n (gt-positive)"]
    if radiologist is not None:
        header += ["radiologist mIoU", "radiologist 95% CI"]
    if reference:
        header += ["reference mIoU"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, task in enumerate(TASKS):
        row = [
            task,
            _fmt(result.miou.value[k]),
            _ci(result.miou.ci[k]),
            str(int(result.miou.n[k])),
            _fmt(result.dataset_iou.value[k]),
            _ci(result.dataset_iou.ci[k]),
        ]
        if result.hit_rate is not None:
            row += [_fmt(result.hit_rate.value[k]), _ci(result.hit_rate.ci[k]), str(int(result.hit_rate.n[k]))]
        if radiologist is not None:
            row += [_fmt(radiologist.miou.value[k]), _ci(radiologist.miou.ci[k])]
        if reference:
            row += [_fmt(reference.get(task))]
        lines.append("| " + " | ".join(row) + " |")
    mean_row = [
        "**mean**",
        f"**{_fmt(result.miou.mean)}**",
        _ci(result.miou.mean_ci),
        "",
        _fmt(result.dataset_iou.mean),
        _ci(result.dataset_iou.mean_ci),
    ]
    if result.hit_rate is not None:
        mean_row += [_fmt(result.hit_rate.mean), _ci(result.hit_rate.mean_ci), ""]
    if radiologist is not None:
        mean_row += [_fmt(radiologist.miou.mean), _ci(radiologist.miou.mean_ci)]
    if reference:
        vals = [v for v in reference.values() if math.isfinite(v)]
        mean_row += [_fmt(float(np.mean(vals))) if vals else "–"]
    lines += ["| " + " | ".join(mean_row) + " |", ""]
    excluded = result.excluded
    if excluded:
        lines += [
            f"Excluded from the mean mIoU (no kept pair, mIoU undefined): {', '.join(excluded)}. The mean is over "
            f"the remaining {len(TASKS) - len(excluded)} pathologies.",
            "",
        ]
    else:
        lines += ["The mean mIoU is the plain mean over the 10 pathologies.", ""]
    lines += [
        "Dataset-level IoU: sum of intersections / sum of unions over all images of the set, whatever the mode "
        "(a segmentation-model convention; not comparable with mIoU).",
        "",
    ]
    if result.hit_rate is not None:
        lines += [
            "Hit rate (pointing game): the argmax of the upsampled raw saliency map at original resolution falls "
            "inside the ground-truth mask; over images whose ground truth is non-empty. Constant maps count as misses.",
            "",
        ]
    for w in warnings_ or []:
        lines += [f"> **Warning:** {w}", ""]
    return "\n".join(lines)


def write_report(
    out_dir: str,
    result: EvaluationResult,
    command: str,
    inputs: Mapping[str, str | None],
    radiologist: EvaluationResult | None = None,
    reference: Mapping[str, float] | None = None,
    warnings_: list[str] | None = None,
) -> str:
    """Write ``report.md`` and the chart ``miou.png`` into ``out_dir``; returns the report path."""
    from chexseg_dist.core.fsio import join, open_file

    plot_miou(join(out_dir, CHART_FILENAME), result, radiologist, reference)
    text = render_report(result, command, inputs, CHART_FILENAME, radiologist, reference, warnings_)
    path = join(out_dir, REPORT_FILENAME)
    with open_file(path, "w") as f:
        f.write(text)
    return path
