"""The weak / full / semi / distill comparison: its one metric, ``results.json``, ``results.md`` and the expert curve.

**The comparison metric** (fixed before any result was seen): CheXlocalize per-image IoU at the original resolution
in true-positive-only mode (``chexseg evaluate``'s default), per pathology the mean over kept pairs, then the plain
mean over the pathologies that have at least one positive in the test ground truth -- the same set for every mode
and reference row -- where a pathology without a kept pair (the model never predicted it on a positive image)
counts 0, not "excluded" (excluding it would reward a model for giving up on a pathology).

Everything here reads the ``summary.json`` files ``chexseg evaluate`` wrote; nothing is recomputed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data.chexlocalize import read_segmentations
from chexseg_dist.metrics.segmentation import rle_areas

MODES: tuple[str, ...] = ("weak", "full", "semi", "distill")
METRIC = (
    "CheXlocalize per-image IoU at original resolution, true-positive-only mode; per pathology the mean over kept "
    "pairs; the plain mean over the pathologies with a positive in the test ground truth (the same set for every "
    "row), a pathology without a kept pair counting 0"
)


def scored_pathologies(gt_path: str) -> list[str]:
    """The pathologies with at least one non-empty mask in a ground-truth segmentation JSON (TASKS order)."""
    gt = read_segmentations(gt_path)
    return [t for t in TASKS if any(rle_areas([entry[t] for entry in gt.values()]) > 0)]


def comparison(summary: Mapping[str, Any], scored: Sequence[str]) -> dict[str, Any]:
    """One row of the comparison from an evaluation ``summary.json`` (tp-only mode).

    Returns:
        ``{"mean_miou", "pathologies": {name: {"miou", "ci", "n"}}, "n_images"}``: ``mean_miou`` is the
        comparison metric; ``miou`` is None where no pair was kept (it counts 0 in the mean).
    """
    if summary.get("mode") != "tp_only":
        raise ValueError(f"the comparison is defined in tp_only mode, got an evaluation in {summary.get('mode')!r}")
    per = summary["pathologies"]
    rows = {t: {"miou": per[t]["miou"], "ci": per[t]["ci"], "n": per[t]["n"]} for t in TASKS}
    values = [rows[t]["miou"] if rows[t]["miou"] is not None else 0.0 for t in scored]
    return {
        "mean_miou": sum(values) / len(values) if values else float("nan"),
        "pathologies": rows,
        "n_images": summary.get("n_images"),
    }


def _per_image(folder: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(image_ids, iou [n, 10], kept [n, 10])`` from an evaluation folder's ``per_image.csv`` (TASKS order)."""
    text = fsio.read_bytes(fsio.join(folder, "per_image.csv")).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    ids = sorted({r["image_id"] for r in rows})
    where = {image_id: i for i, image_id in enumerate(ids)}
    col = {t: k for k, t in enumerate(TASKS)}
    iou, kept = np.zeros((len(ids), len(TASKS))), np.zeros((len(ids), len(TASKS)))
    for r in rows:
        i, k = where[r["image_id"]], col[r["pathology"]]
        kept[i, k] = float(r["kept"])
        iou[i, k] = float(r["iou"]) if r["iou"] else 0.0
    return ids, iou, kept


def _comparison_metric(iou: np.ndarray, kept: np.ndarray, weights: np.ndarray, scored: Sequence[int]) -> np.ndarray:
    """The comparison metric for image weights ``[B, n]`` (one row per resample): per pathology the weighted mean
    IoU over kept pairs (0 when none is kept), then the plain mean over the scored pathologies; ``[B]``."""
    num = weights @ (iou * kept)
    den = weights @ kept
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return per[:, list(scored)].mean(axis=1) if len(scored) else np.full(len(weights), np.nan)


def paired_difference(
    folder: str, baseline: str, scored: Sequence[str], n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The comparison metric of one evaluation minus another's on the same test images, with a paired bootstrap CI:
    every resample draws the same images for both (their ``per_image.csv`` files), so what the two rows share (hard
    or easy images) cancels in the difference.

    Returns:
        ``{"difference", "ci": [lo, hi], "n_images", "n_bootstrap"}`` (95% percentile interval).

    Raises:
        ValueError: the two evaluations are not of the same images.
    """
    from chexseg_dist.metrics.bootstrap import bootstrap_counts, percentile_ci

    ids_a, iou_a, kept_a = _per_image(folder)
    ids_b, iou_b, kept_b = _per_image(baseline)
    if ids_a != ids_b:
        raise ValueError(f"{folder} and {baseline} evaluate different test images; a paired difference needs the same")
    cols = [TASKS.index(t) for t in scored]
    ones = np.ones((1, len(ids_a)))
    point = _comparison_metric(iou_a, kept_a, ones, cols)[0] - _comparison_metric(iou_b, kept_b, ones, cols)[0]
    counts = bootstrap_counts(len(ids_a), n_bootstrap, seed)
    diffs = _comparison_metric(iou_a, kept_a, counts, cols) - _comparison_metric(iou_b, kept_b, counts, cols)
    lo, hi = percentile_ci(diffs[:, None])[0] if n_bootstrap else (float("nan"), float("nan"))
    return {
        "difference": float(point),
        "ci": [float(lo), float(hi)],
        "n_images": len(ids_a),
        "n_bootstrap": int(n_bootstrap),
    }


def read_summary(folder: str) -> dict[str, Any]:
    """An evaluation folder's ``summary.json``."""
    with fsio.open_file(fsio.join(folder, "summary.json"), "r") as f:
        return dict(json.load(f))


def gains(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Relative gains of semi over full and over weak (the paper's +9.7% and +73.1%)."""

    def ratio(a: str, b: str) -> float | None:
        if a not in modes or b not in modes:
            return None
        x, y = modes[a]["mean_miou"], modes[b]["mean_miou"]
        return x / y - 1.0 if y and math.isfinite(y) and math.isfinite(x) else None

    return {"semi_vs_full": ratio("semi", "full"), "semi_vs_weak": ratio("semi", "weak")}


def _cell(value: float | None, ci: Sequence[float | None] | None = None) -> str:
    if value is None:
        return "0 (none kept)"
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the headline table, per-pathology tables with CIs, the sensitivity row, the curve, timings."""
    scored = results["pathologies_scored"]
    lines = [
        "# CheXseg on phantom radiographs: weak / full / semi / distill",
        "",
        f"Data: `{results['data']}` ({results.get('test_images', '?')} test images); preset `{results['preset']}`; "
        f"student {results['student']}; {results['steps']} optimizer steps per mode.",
        "",
        f"Comparison metric: {METRIC}. Pathologies scored ({len(scored)}): {', '.join(scored)}.",
        "",
        "## Headline (expert masks drawn by the calibrated annotator)",
        "",
        "| row | mean mIoU | " + " | ".join(TASKS) + " |",
        "|---|---|" + "---|" * len(TASKS),
    ]

    def row(name: str, entry: Mapping[str, Any]) -> str:
        cells = [_cell(entry["pathologies"][t]["miou"]) if t in scored else "–" for t in TASKS]
        return f"| {name} | **{entry['mean_miou']:.4f}** | " + " | ".join(cells) + " |"

    for mode in MODES:
        if mode in results["modes"]:
            lines.append(row(mode, results["modes"][mode]))
    for name, entry in results.get("reference", {}).items():
        lines.append(row(f"reference: {name}", entry))
    g = results["gains"]
    paired = results.get("paired_vs_full") or {}
    lines += [
        "",
        f"semi vs full: {_pct(g['semi_vs_full'])} (paper: +9.7%); semi vs weak: {_pct(g['semi_vs_weak'])} "
        "(paper: +73.1%).",
    ]
    if paired:
        lines += [
            "",
            "Each mode minus full, comparison metric, with a paired 95% bootstrap CI over the test images (the same "
            "resampled images for both): "
            + "; ".join(f"{m} {p['difference']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]" for m, p in paired.items())
            + ".",
        ]
    lines += [
        "",
        "### Per pathology with 95% bootstrap CIs (headline)",
        "",
        "| pathology | n | " + " | ".join(m for m in MODES if m in results["modes"]) + " |",
        "|---|---|" + "---|" * len([m for m in MODES if m in results["modes"]]),
    ]
    for t in TASKS:
        n = next((results["modes"][m]["pathologies"][t]["n"] for m in MODES if m in results["modes"]), 0)
        cells = [
            _cell(results["modes"][m]["pathologies"][t]["miou"], results["modes"][m]["pathologies"][t]["ci"])
            for m in MODES
            if m in results["modes"]
        ]
        lines.append(f"| {t}{'' if t in scored else ' (not scored)'} | {n} | " + " | ".join(cells) + " |")
    sens = results.get("sensitivity_exact_experts")
    if sens:
        sg = sens["gains"]
        lines += [
            "",
            "## Sensitivity: the same comparison with exact expert masks",
            "",
            "| mode | mean mIoU (exact experts) | mean mIoU (annotated experts) |",
            "|---|---|---|",
        ]
        for mode in MODES:
            if mode in sens["modes"]:
                head = results["modes"].get(mode, {}).get("mean_miou")
                lines.append(
                    f"| {mode} | {sens['modes'][mode]['mean_miou']:.4f} | {'' if head is None else f'{head:.4f}'} |"
                )
        lines += ["", f"semi vs full: {_pct(sg['semi_vs_full'])}; semi vs weak: {_pct(sg['semi_vs_weak'])}."]
    curve = results.get("expert_curve")
    if curve:
        lines += [
            "",
            "## Where do pseudo-labels pay? mean mIoU against expert-set size",
            "",
            "| expert-train images | full | semi | semi / full - 1 |",
            "|---|---|---|---|",
        ]
        for n, f_, s_ in zip(curve["sizes"], curve["full"], curve["semi"]):
            lines.append(f"| {n} | {f_:.4f} | {s_:.4f} | {_pct(s_ / f_ - 1 if f_ else None)} |")
        lines.append("")
        lines.append("![expert curve](expert_curve.png)")
    refiners = results.get("refiners")
    if refiners:
        details = results.get("refiner_details", {})
        lines += [
            "",
            "## Pseudo-label refiners (comparison mean)",
            "",
            "`pseudo`: the refined tuned Grad-CAM masks on test (`none`: the Grad-CAM reference row);",
            "`weak` and `semi`: students trained on that refiner's masks (`none`: the headline rows).",
            "",
            "| refiner | pseudo | weak | semi | semi vs semi on none |",
            "|---|---|---|---|---|",
        ]
        base = refiners.get("none", {}).get("semi")
        for name, vals in refiners.items():
            gain = vals["semi"] / base - 1 if base else None
            lines.append(
                f"| {name} | {vals['pseudo_miou']:.4f} | {vals['weak']:.4f} | {vals['semi']:.4f} | {_pct(gain)} |"
            )
        if details:
            names = list(details)
            lines += [
                "",
                "Pseudo-labels per pathology with 95% bootstrap CIs:",
                "",
                "| pathology | none | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names),
            ]
            none_rows = (
                results.get("reference", {}).get("Grad-CAM tuned (classifier saliency)", {}).get("pathologies", {})
            )
            for t in scored:
                cells = [_cell(none_rows[t]["miou"], none_rows[t]["ci"]) if t in none_rows else "n/a"]
                for name in names:
                    entry = details[name]["pseudo"]["pathologies"][t]
                    cells.append(_cell(entry["miou"], entry["ci"]))
                lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Seconds per stage", "", "| stage | seconds |", "|---|---|"]
    for name, sec in results["stage_seconds"].items():
        lines.append(f"| {name} | {sec:.1f} |")
    lines.append(f"| **total** | **{sum(results['stage_seconds'].values()):.1f}** |")
    return "\n".join(lines) + "\n"


def write_results(out: str, results: Mapping[str, Any]) -> tuple[str, str]:
    """Write ``results.json`` and ``results.md`` into ``out``; returns their paths."""
    json_path, md_path = fsio.join(out, "results.json"), fsio.join(out, "results.md")
    with fsio.open_file(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with fsio.open_file(md_path, "w") as f:
        f.write(markdown(results))
    return json_path, md_path


def plot_expert_curve(path: str, curve: Mapping[str, Any]) -> str:
    """``expert_curve.png``: comparison mIoU of full and semi against the number of expert-train images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(curve["sizes"], curve["full"], "o-", label="full (expert only)")
    ax.plot(curve["sizes"], curve["semi"], "s-", label="semi (expert + pseudo-labels)")
    if curve.get("weak") is not None:
        ax.axhline(curve["weak"], color="grey", linestyle="--", label="weak (pseudo-labels only)")
    ax.set_xlabel("expert-train images")
    ax.set_ylabel("comparison mIoU (tp-only, test)")
    ax.set_xscale("log")
    ax.set_xticks(curve["sizes"], [str(n) for n in curve["sizes"]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fsio.open_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
