"""The paired bootstrap of a mode's comparison metric minus full's: the point estimate is the difference of the two
rows' metric (a pathology without a kept pair counting 0), the interval resamples the same images for both, so a
mode better on every image has an interval above 0, two equal evaluations give exactly 0, and results.md says it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.evaluation.experiment import MODES, markdown, paired_difference


def _evaluation(folder: Path, iou: np.ndarray, kept: np.ndarray) -> str:
    """A ``per_image.csv`` as chexseg evaluate writes it, for ``iou``/``kept`` ``[n, 10]``."""
    folder.mkdir()
    with open(folder / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "pathology", "gt_area", "pred_area", "intersection", "union", "iou", "kept"])
        for i in range(len(iou)):
            for k, t in enumerate(TASKS):
                w.writerow([f"img{i:03d}", t, 1, 1, 0, 1, f"{iou[i, k]:.6f}" if kept[i, k] else "", int(kept[i, k])])
    return str(folder)


def test_the_paired_difference_is_the_metrics_difference_with_a_ci_over_the_same_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 40
    kept = (rng.uniform(size=(n, len(TASKS))) > 0.5).astype(float)
    kept[:, 2] = 0  # a pathology nobody kept: counts 0 in both rows
    base_iou = rng.uniform(0.1, 0.5, size=(n, len(TASKS)))
    full = _evaluation(tmp_path / "full", base_iou, kept)
    semi = _evaluation(tmp_path / "semi", base_iou + 0.05, kept)  # better on every kept pair
    scored = list(TASKS[:4])
    got = paired_difference(semi, full, scored, n_bootstrap=500, seed=1)

    def metric(iou: np.ndarray) -> float:
        per = [(iou[:, k] * kept[:, k]).sum() / kept[:, k].sum() if kept[:, k].sum() else 0.0 for k in range(4)]
        return float(np.mean(per))

    assert got["difference"] == pytest.approx(metric(base_iou + 0.05) - metric(base_iou), abs=1e-6)
    assert got["n_images"] == n and got["n_bootstrap"] == 500
    assert 0 < got["ci"][0] <= got["difference"] <= got["ci"][1]
    # Equal evaluations: the pairing cancels everything, in every resample.
    assert paired_difference(full, full, scored, 200, 0) == {"difference": 0.0, "ci": [0.0, 0.0], "n_images": n,
                                                             "n_bootstrap": 200}  # fmt: skip
    other = _evaluation(tmp_path / "other", base_iou[:-1], kept[:-1])
    with pytest.raises(ValueError, match="different test images"):
        paired_difference(other, full, scored)


def test_results_md_states_each_modes_paired_difference_to_full() -> None:
    row = {"mean_miou": 0.2, "pathologies": {t: {"miou": 0.2, "ci": [0.1, 0.3], "n": 3} for t in TASKS}}
    results = {
        "data": "D", "preset": "tiny", "student": "s", "steps": 6, "pathologies_scored": list(TASKS[:2]),
        "modes": {m: row for m in MODES}, "gains": {"semi_vs_full": 0.0, "semi_vs_weak": 0.0},
        "paired_vs_full": {"semi": {"difference": 0.0123, "ci": [-0.004, 0.031], "n_images": 10, "n_bootstrap": 9}},
        "stage_seconds": {},
    }  # fmt: skip
    assert "semi +0.0123 [-0.0040, +0.0310]" in markdown(results)
