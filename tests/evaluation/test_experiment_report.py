"""results.md renders the refiner comparison that results.json holds (what a reader of the report sees)."""

from __future__ import annotations

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.evaluation.experiment import MODES, markdown


def _row(value: float) -> dict:
    return {
        "mean_miou": value,
        "pathologies": {t: {"miou": value, "ci": [value - 0.01, value + 0.01], "n": 3} for t in TASKS},
        "n_images": 10,
    }


def test_results_md_has_the_refiner_table_with_gains_and_per_pathology_cis() -> None:
    results = {
        "data": "D",
        "preset": "tiny",
        "student": "deeplabv3plus/resnet18 at 128 px",
        "steps": 200,
        "pathologies_scored": list(TASKS[:2]),
        "test_images": 10,
        "modes": {m: _row(0.2) for m in MODES},
        "gains": {"semi_vs_full": 0.0, "semi_vs_weak": 0.0},
        "reference": {"Grad-CAM tuned (classifier saliency)": _row(0.1)},
        "refiners": {
            "none": {"pseudo_miou": 0.1, "weak": 0.13, "semi": 0.2},
            "crf": {"pseudo_miou": 0.12, "weak": 0.11, "semi": 0.25},
        },
        "refiner_details": {"crf": {"pseudo": _row(0.12), "weak": _row(0.11), "semi": _row(0.25)}},
        "stage_seconds": {"x": 1.0},
    }
    text = markdown(results)
    assert "| crf | 0.1200 | 0.1100 | 0.2500 | +25.0% |" in text
    assert f"| {TASKS[0]} | 0.100 [0.090, 0.110] | 0.120 [0.110, 0.130] |" in text
    del results["refiners"]
    assert "Pseudo-label refiners" not in markdown(results)
