"""``chexseg experiment`` end to end on a miniature synth directory uploaded to the moto S3 server, with every output
on S3, on the tests' local Ray cluster: every stage, the four students and their scores on test, the reference rows,
the expert curve, and a re-run that reuses every finished stage. Nothing is written to local disk but the logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from student_helpers import SMALL_STUDENT

from chexseg_dist.config import load_config
from chexseg_dist.core import fsio
from chexseg_dist.evaluation.layout import ExperimentLayout
from chexseg_dist.synth.writer import generate

MINIATURE = [
    "classifier.image_size=64",
    "train_classifier.epochs=1",
    "train_classifier.batch_size=16",
    "pseudolabel.batch_size=8",
    *SMALL_STUDENT,
]


def _text(uri: str) -> str:
    return fsio.read_bytes(uri).decode("utf-8")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.s3
def test_experiment_on_s3_runs_every_mode_end_to_end_and_reuses_finished_stages(
    ray_cluster: None, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.cli import main

    local = tmp_path / "data"
    synth = ["synth.seed=11", "synth.n_train=40", "synth.n_valid=24", "synth.n_test=10", "synth.size=96"]
    generate(str(local), load_config("tiny", overrides=synth).synth)
    fs, bucket = fsio.filesystem(s3_bucket)
    fs.put(f"{local}/", f"{bucket}/data", recursive=True)
    before = sorted(tmp_path.rglob("*"))
    data, out = f"{s3_bucket}/data", f"{s3_bucket}/exp"
    at = ExperimentLayout(data, out)
    argv = ["experiment", "--data", data, "--out", out, "--no-sensitivity", "--expert-sizes", "4,all"]
    argv += [arg for item in MINIATURE for arg in ("--set", item)]
    assert main(argv) == 0
    console = capsys.readouterr().out
    commands = ("train-classifier", "pseudolabel", "expert-split", "tune-thresholds", "segment",
                "train-segmentation --mode distill")  # fmt: skip
    for command in commands:
        assert f"$ chexseg {command}" in console, command
    results = json.loads(_text(at.results_json))
    assert set(results["modes"]) == {"weak", "full", "semi", "distill"}
    scored = results["pathologies_scored"]
    assert scored and all(set(scored) <= set(row["pathologies"]) for row in results["modes"].values())
    for mode, row in results["modes"].items():
        # The comparison mean is the plain mean over the same scored pathologies for every mode.
        per = [row["pathologies"][name]["miou"] or 0.0 for name in scored]  # none kept counts 0
        assert row["mean_miou"] == pytest.approx(sum(per) / len(per)), mode
        assert row["n_images"] == 10 and 0.0 <= row["mean_miou"] <= 1.0
        assert {"select_miou_full", "select_miou_tp", "epoch"} <= set(row["select"])
        assert fsio.isfile(f"{at.student('annotated', mode)}/segmentation.json")
    semi, full, weak = (results["modes"][m]["mean_miou"] for m in ("semi", "full", "weak"))
    g = results["gains"]
    assert g["semi_vs_full"] == (pytest.approx(semi / full - 1) if full else None)
    assert g["semi_vs_weak"] == (pytest.approx(semi / weak - 1) if weak else None)
    # Each mode minus full with a paired bootstrap CI over the same test images: its point estimate is the two rows'
    # difference (per_image.csv rounds IoUs to 6 decimals).
    paired = results["paired_vs_full"]
    assert set(paired) == {"weak", "semi", "distill"}
    for mode, p in paired.items():
        assert p["difference"] == pytest.approx(results["modes"][mode]["mean_miou"] - full, abs=1e-5), mode
        assert p["ci"][0] <= p["difference"] <= p["ci"][1] and p["n_images"] == 10
    assert "sensitivity_exact_experts" not in results  # --no-sensitivity
    assert len(results["reference"]) == 2
    # Every student saw the same number of images in the same number of optimizer steps.
    modes = ("weak", "full", "semi", "distill")
    epochs = [json.loads(_text(f"{at.student('annotated', m)}/metrics.json"))["epochs"] for m in modes]
    seen = {sum(e["train_images"] for e in history) for history in epochs}
    assert seen == {3 * 4}  # steps_per_epoch x batch_size, one epoch
    curve = results["expert_curve"]
    n_train = sum(1 for line in _text(f"{at.expert_split('annotated')}/split.csv").splitlines()[1:]
                  if line.split(",")[-1] == "expert_train")  # fmt: skip
    assert curve["sizes"] == [4, n_train] and len(curve["full"]) == len(curve["semi"]) == 2
    assert curve["full"][1] == full and curve["semi"][1] == semi  # "all" is the headline's students
    assert len(fsio.read_bytes(at.expert_curve_png)) > 1000
    md = _text(at.results_md)
    for mode in ("weak", "full", "semi", "distill"):
        assert f"| {mode} | **{results['modes'][mode]['mean_miou']:.4f}**" in md
    assert "semi vs full" in md and "Seconds per stage" in md
    # A re-run trains nothing again: every finished stage is reused and the results are the same.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "train weak: reused" in again and "train the classifier: reused" in again
    assert "train semi (4 expert images): reused" in again
    rerun = json.loads(_text(at.results_json))
    assert {m: r["mean_miou"] for m, r in rerun["modes"].items()} == {
        m: r["mean_miou"] for m, r in results["modes"].items()
    }
    # Every output went to S3 (Ray Train's runs too: <checkpoint>.ray beside each S3 checkpoint), none to local disk.
    assert sorted(tmp_path.rglob("*")) == before
    assert fs.ls(f"{bucket}/exp/classifier.ray") and fs.ls(f"{bucket}/exp/annotated/students/semi.ray")
