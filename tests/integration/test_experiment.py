"""``chexseg experiment`` end to end on a miniature synth directory, on the tests' local Ray cluster: every stage,
the four students and their scores on test, the reference rows, the expert curve, and a re-run that reuses every
finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from student_helpers import SMALL_STUDENT

from chexseg_dist.config import load_config
from chexseg_dist.synth.writer import generate

MINIATURE = [
    "classifier.image_size=64",
    "train_classifier.epochs=1",
    "train_classifier.batch_size=16",
    "pseudolabel.batch_size=8",
    *SMALL_STUDENT,
]


@pytest.mark.slow
@pytest.mark.cluster
def test_experiment_runs_every_mode_end_to_end_and_reuses_finished_stages(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.cli import main

    data = tmp_path / "data"
    synth = ["synth.seed=11", "synth.n_train=40", "synth.n_valid=24", "synth.n_test=10", "synth.size=96"]
    generate(str(data), load_config("tiny", overrides=synth).synth)
    out = tmp_path / "exp"
    argv = ["experiment", "--data", str(data), "--out", str(out), "--no-sensitivity", "--expert-sizes", "4,all"]
    argv += [arg for item in MINIATURE for arg in ("--set", item)]
    assert main(argv) == 0
    console = capsys.readouterr().out
    commands = ("train-classifier", "pseudolabel", "expert-split", "tune-thresholds", "segment",
                "train-segmentation --mode distill")  # fmt: skip
    for command in commands:
        assert f"$ chexseg {command}" in console, command
    results = json.loads((out / "results.json").read_text())
    assert set(results["modes"]) == {"weak", "full", "semi", "distill"}
    scored = results["pathologies_scored"]
    assert scored and all(set(scored) <= set(row["pathologies"]) for row in results["modes"].values())
    for mode, row in results["modes"].items():
        # The comparison mean is the plain mean over the same scored pathologies for every mode.
        per = [row["pathologies"][name]["miou"] or 0.0 for name in scored]  # none kept counts 0
        assert row["mean_miou"] == pytest.approx(sum(per) / len(per)), mode
        assert row["n_images"] == 10 and 0.0 <= row["mean_miou"] <= 1.0
        assert {"select_miou_full", "select_miou_tp", "epoch"} <= set(row["select"])
        assert (out / "annotated" / "students" / mode / "segmentation.json").is_file()
    semi, full, weak = (results["modes"][m]["mean_miou"] for m in ("semi", "full", "weak"))
    g = results["gains"]
    assert g["semi_vs_full"] == (pytest.approx(semi / full - 1) if full else None)
    assert g["semi_vs_weak"] == (pytest.approx(semi / weak - 1) if weak else None)
    assert "sensitivity_exact_experts" not in results  # --no-sensitivity
    assert len(results["reference"]) == 2
    # Every student saw the same number of images in the same number of optimizer steps.
    students = out / "annotated" / "students"
    epochs = [
        json.loads((students / m / "metrics.json").read_text())["epochs"] for m in ("weak", "full", "semi", "distill")
    ]
    seen = {sum(e["train_images"] for e in history) for history in epochs}
    assert seen == {3 * 4}  # steps_per_epoch x batch_size, one epoch
    curve = results["expert_curve"]
    n_train = sum(1 for line in (out / "annotated" / "expert" / "split.csv").read_text().splitlines()[1:]
                  if line.split(",")[-1] == "expert_train")  # fmt: skip
    assert curve["sizes"] == [4, n_train] and len(curve["full"]) == len(curve["semi"]) == 2
    assert curve["full"][1] == full and curve["semi"][1] == semi  # "all" is the headline's students
    assert (out / "expert_curve.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    for mode in ("weak", "full", "semi", "distill"):
        assert f"| {mode} | **{results['modes'][mode]['mean_miou']:.4f}**" in md
    assert "semi vs full" in md and "Seconds per stage" in md
    # A re-run trains nothing again: every finished stage is reused and the results are the same.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "train weak: reused" in again and "train the classifier: reused" in again
    assert "train semi (4 expert images): reused" in again
    rerun = json.loads((out / "results.json").read_text())
    assert {m: r["mean_miou"] for m, r in rerun["modes"].items()} == {
        m: r["mean_miou"] for m, r in results["modes"].items()
    }
