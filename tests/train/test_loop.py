"""The shared training loop's driver-side pieces, without starting Ray: finding the user's error inside Ray's
wrappers, and refusing to resume a run of another model before any worker starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from chexseg_dist.config import load_config
from chexseg_dist.errors import ManifestError, TrainingError
from chexseg_dist.train._loop import STATE_FILE, _user_error, check_resumable
from chexseg_dist.train.classifier import ClassifierTask


def test_a_workers_bad_input_error_is_found_inside_rays_wrappers() -> None:
    inner = TrainingError("run r holds another model")
    wrapped = WorkerGroupError("Training failed due to worker errors", {0: RuntimeError("rank 1 gave up"), 1: inner})
    assert _user_error(wrapped) is inner
    bad = ManifestError("valid manifest m.parquet: no rows")
    assert _user_error(ControllerError(bad)) is bad
    chained = RuntimeError("outer")
    chained.__cause__ = WorkerGroupError("x", {0: bad})
    assert _user_error(chained) is bad
    assert _user_error(WorkerGroupError("x", {0: ValueError("a bug")})) is None  # bugs stay bugs


def test_resuming_a_run_of_another_model_is_refused_on_the_driver(tmp_path: Path) -> None:
    cfg = load_config("tiny", overrides=["classifier.image_size=64"])
    task = ClassifierTask(cfg, "train.parquet", "valid.parquet", str(tmp_path / "failures"), "r")
    run = tmp_path / "runs" / "ckpt"
    check_resumable(task, str(tmp_path / "runs"), "ckpt")  # no run yet: nothing to check
    os.makedirs(run / "epoch_0000")
    os.makedirs(run / "epoch_0001")
    torch.save({"identity": task.identity()}, run / "epoch_0000" / STATE_FILE)
    other = {**task.identity(), "image_size": 32}
    torch.save({"identity": other}, run / "epoch_0001" / STATE_FILE)  # the newest epoch decides
    with pytest.raises(TrainingError, match=r"holds .*'image_size': 32.*asks for .*'image_size': 64"):
        check_resumable(task, str(tmp_path / "runs"), "ckpt")
    torch.save({"identity": task.identity()}, run / "epoch_0001" / STATE_FILE)
    check_resumable(task, str(tmp_path / "runs"), "ckpt")
