"""Classifier training on a real local Ray cluster: what the classifier task owns (AUROC, the per-image failure
records of the shared decode stage, its checkpoint's round trip into pseudo-labelling, its identity). The loop's own
properties (resume, the fault drill and its retry, best-epoch export, re-export) are proved once with the debug task
in tests/train/test_loop_cluster.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from chexseg_dist.config import load_config
from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.data import frame_from_bytes
from chexseg_dist.errors import TrainingError


@pytest.fixture(scope="module")
def data(cxp_world: dict[str, str]) -> dict[str, str]:
    return cxp_world


SMALL = [
    "classifier.image_size=32",
    "train_classifier.batch_size=8",
    "train_classifier.log_every_steps=0",
    "train_classifier.lr=0.003",
]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_trained_classifier_learns_records_left_out_images_and_round_trips(
    ray_cluster: None, data: dict[str, str], tmp_path: Path
) -> None:
    from chexseg_dist.saliency.classifier import load_classifier, predict_with_cams
    from chexseg_dist.train.classifier import train_classifier

    out = str(tmp_path / "ckpt")
    cfg = load_config("tiny", overrides=[*SMALL, "train_classifier.epochs=2", "train_classifier.use_gpu=auto"])
    result = train_classifier(cfg, data["train"], data["valid"], out, verbose=False)
    assert result.start_epoch == 0 and [m["epoch"] for m in result.history] == [0, 1]
    # "auto" was resolved for the run (no GPU here) and recorded with it; the config keeps what was asked.
    assert cfg.train_classifier.use_gpu == "auto"
    saved_config = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert saved_config["train_classifier"]["use_gpu"] == "auto" and saved_config["run"]["use_gpu"] is False
    # 2 undecodable train images were left out and recorded, never trained on.
    assert all(m["failed_images"] == 2 and m["train_images"] == 38 for m in result.history)
    assert all(m["valid_images"] == 16 for m in result.history)
    with open(tmp_path / "ckpt" / "failures.csv") as f:
        failed = list(csv.DictReader(f))
    assert sorted((r["split"], int(r["row"])) for r in failed) == [("train", 0), ("train", 1)]
    assert all(r["stage"] == "decode" and r["path"].endswith(".png") for r in failed)

    saved = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert [m["epoch"] for m in saved["epochs"]] == [0, 1]
    assert saved["best_epoch"] == result.best_epoch
    assert (tmp_path / "ckpt" / "metrics.csv").read_text().count("\n") == 3
    assert "train_classifier" in (tmp_path / "ckpt" / "config.yaml").read_text()

    loaded = load_classifier(out)
    meta = loaded.meta
    assert meta["metrics"]["epoch"] == result.best_epoch
    assert meta["metrics"]["mean_task_auroc"] == pytest.approx(result.best_metrics["mean_task_auroc"])
    assert set(meta["metrics"]["per_task_auroc"]) == set(TASKS)
    assert meta["config"]["train_classifier"]["epochs"] == 2 and meta["image_size"] == 32
    # The disk that marks Cardiomegaly is easy: the classifier must have learnt it.
    assert result.best_metrics["auroc/Cardiomegaly"] > 0.8

    frames = torch.from_numpy(np.stack([frame_from_bytes(_png(i), 32)[0] for i in range(3)]))[:, None]
    probs, cams = predict_with_cams(loaded, frames)
    assert probs.shape == (3, len(OBSERVATIONS)) and cams.shape[:2] == (3, len(OBSERVATIONS))
    assert bool(torch.isfinite(cams).all()) and float(cams.min()) >= 0.0

    # A re-run with the same epochs has nothing left to train: it re-exports the same best epoch (no trainer).
    third = train_classifier(cfg, data["train"], data["valid"], out, verbose=False)
    assert third.start_epoch == 2 and third.best_epoch == result.best_epoch and len(third.history) == 2
    assert load_classifier(out).meta["fingerprint"] == meta["fingerprint"]

    # A run of another classifier into the same run: refused (on the driver), naming the frame sizes.
    other = load_config("tiny", overrides=[*SMALL, "classifier.image_size=48", "train_classifier.max_failures=0"])
    with pytest.raises(TrainingError, match=r"holds .*'image_size': 32.*asks for .*'image_size': 48"):
        train_classifier(other, data["train"], data["valid"], out, verbose=False)

    # And the pseudo-labelling job (another stage) accepts the checkpoint as is.
    from chexseg_dist.pseudolabel.job import run_pseudolabel

    summary = run_pseudolabel(cfg, data["valid"], out, str(tmp_path / "maps.zarr"))
    assert summary.processed == 16 and summary.failed == 0


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
