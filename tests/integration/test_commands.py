"""The commands as a user runs them: ``chexseg demo`` end to end at miniature size, and ``jobs/train_classifier.py`` as
a subprocess with its own local Ray. Both check what the console shows and what goes to the log instead."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import job_env, kill_session_processes

REPO = Path(__file__).resolve().parents[2]

#: Lines Ray and its libraries print that a user should not have to read (they belong in the log).
RAY_NOISE = ("Execution plan of Dataset", "Started a local Ray instance", "Reporting training result", "(raylet)")


def _assert_quiet(console: str, log: Path) -> None:
    for noise in RAY_NOISE[:3]:
        assert noise not in console, f"{noise!r} reached the console"
    text = log.read_text()
    assert "Execution plan of Dataset" in text  # ...because it went to the log


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_runs_end_to_end_at_miniature_size(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    ray_tmp = Path(f"/tmp/rd{tmp_path.name[-6:]}_")  # short: Ray's socket paths must stay under 107 bytes
    overrides = [
        "synth.n_train=32",
        "synth.n_valid=10",
        "synth.n_test=10",
        "synth.size=96",
        "classifier.image_size=64",
        "train_classifier.epochs=1",
        "train_classifier.batch_size=16",
        "segmentation.image_size=64",
        "train_segmentation.steps_per_epoch=3",
        "train_segmentation.epochs=1",
        "train_segmentation.batch_size=4",
        "train_segmentation.expert_ratio=0.5",
        "train_segmentation.torch_threads=1",
    ]
    cmd = [sys.executable, "-m", "chexseg_dist.cli.main", "demo", "--out", str(out), "--n-overlays", "1"]
    cmd += [arg for item in overrides for arg in ("--set", item)]
    try:
        done = subprocess.run(cmd, env=job_env(ray_tmp), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        kill_session_processes(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    console = done.stdout
    for stage in ("$ chexseg synth", "$ chexseg train-classifier", "$ chexseg pseudolabel", "$ chexseg evaluate",
                  "$ chexseg train-segmentation --mode semi", "$ chexseg segment"):  # fmt: skip
        assert stage in console, stage
    assert "[train-classifier] epoch 1/1" in console and "Demo finished" in console
    assert "pseudolabel: processed 10, skipped 0 (already done), failed 0" in console
    _assert_quiet(console + done.stderr, out / "demo.log")
    for report in ("otsu", "tuned", "semi"):
        summary = json.loads((out / "eval" / report / "summary.json").read_text())
        assert summary["n_images"] == 10 and set(summary["pathologies"]) >= {"Cardiomegaly", "Edema"}
    assert len(list((out / "overlays").glob("*.png"))) == 1


@pytest.mark.slow
@pytest.mark.cluster
def test_train_classifier_job_trains_on_two_workers_and_records_unreadable_images(
    cxp_world: dict[str, str], tmp_path: Path
) -> None:
    """``jobs/train_classifier.py`` as a user runs it (its own local Ray, console and log), two DDP workers sharing
    the data. The fault drill and its retry are the loop's, proved with the debug task (tests/train)."""
    data = cxp_world
    out = tmp_path / "ckpt"
    ray_tmp = Path(f"/tmp/rt{tmp_path.name[-6:]}_")
    cmd = [sys.executable, str(REPO / "jobs" / "train_classifier.py"), "--train", data["train"]]
    cmd += ["--valid", data["valid"], "--out", str(out)]
    overrides = [
        "classifier.image_size=32",
        "train_classifier.epochs=2",
        "train_classifier.batch_size=8",
        # Two DDP workers: the whole group restarts and the data are split between them.
        "train_classifier.num_workers=2",
        "train_classifier.cpus_per_worker=0.5",
        "train_classifier.decode_cpus=0.5",
    ]
    cmd += [arg for item in overrides for arg in ("--set", item)]
    env = job_env(ray_tmp)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    finally:
        kill_session_processes(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "[train-classifier] epoch 2/2" in done.stdout and "Classifier: best epoch" in done.stdout
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [m["epoch"] for m in history] == [0, 1]
    # 38 decodable rows split equally over 2 workers, every one trained on; the 2 unreadable ones recorded.
    assert all(m["train_images"] == 38 and m["failed_images"] == 2 for m in history)
    assert "2 unreadable image(s) left out" in done.stdout
    _assert_quiet(done.stdout + done.stderr, out / "train.log")
    assert (out / "checkpoint.json").is_file() and (out / "model.pt").is_file()
    with open(out / "failures.csv") as f:
        assert sorted((r["split"], int(r["row"])) for r in csv.DictReader(f)) == [("train", 0), ("train", 1)]
