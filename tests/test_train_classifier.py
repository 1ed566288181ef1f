"""Classifier training: loss, augmentation and decoding (no Ray), and Ray Train runs (resume, retry, round trip)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chexseg_dist.config import TrainClassifierConfig, load_config
from chexseg_dist.images import frame_from_bytes
from chexseg_dist.pathologies import CSV_HEADER, OBSERVATIONS, TASKS
from chexseg_dist.training import (
    BATCH_DTYPES,
    FaultInjection,
    augment_batch,
    decode_batch,
    masked_bce_with_logits,
    read_label_table,
    resolve_run,
)

CARDIO = OBSERVATIONS.index("Cardiomegaly")


# ------------------------------------------------------------------------------------------------------ data


def _write_split(root: Path, split: str, n: int, seed: int, corrupt: int = 0, laterals: int = 0) -> Path:
    """A small CheXpert-format split: noise images, a bright disk where Cardiomegaly is positive; returns the CSV.

    The first ``corrupt`` frontal files are not images; ``laterals`` extra lateral views are added.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + laterals):
        lateral = i >= n
        view = "view2_lateral" if lateral else "view1_frontal"
        rel = f"{split}/patient{seed * 1000 + i:05d}/study1/{view}.png"
        labels = list(rng.choice(["1.0", "0.0", "-1.0", ""], size=len(OBSERVATIONS), p=[0.3, 0.4, 0.1, 0.2]))
        labels[CARDIO] = "1.0" if i % 2 else "0.0"
        img = rng.normal(90, 20, (40, 48))
        if labels[CARDIO] == "1.0":
            yy, xx = np.mgrid[:40, :48]
            img[(yy - 20) ** 2 + (xx - 24) ** 2 < 100] += 100
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i < corrupt:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        rows.append([f"CheXpert-v1.0-small/{rel}", "F", "50", "Lateral" if lateral else "Frontal", "AP", *labels])
    csv_path = root / f"{split}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    return csv_path


def _manifest(csv_path: Path) -> str:
    from chexseg_dist.manifest import manifest_from_csv, write_manifest

    out = str(csv_path.with_suffix(".parquet"))
    write_manifest(manifest_from_csv(str(csv_path)), out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cxp")
    return {
        "train": _manifest(_write_split(root, "train", 40, 1, corrupt=2, laterals=3)),
        "valid": _manifest(_write_split(root, "valid", 16, 2)),
    }


# -------------------------------------------------------------------------------------------- without Ray


def test_masked_bce_averages_only_unmasked_cells() -> None:
    logits = torch.tensor([[2.0, -1.0, 50.0], [0.5, 0.0, -3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = masked_bce_with_logits(logits, targets, mask)
    kept = [(2.0, 1.0), (-1.0, 0.0), (0.5, 0.0), (0.0, 1.0), (-3.0, 1.0)]
    expected = np.mean([np.log1p(np.exp(-z)) if t else np.log1p(np.exp(z)) for z, t in kept])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad[0, 2] == 0.0  # the masked (confidently wrong) cell is inert
    empty = masked_bce_with_logits(logits, targets, torch.zeros_like(mask))
    assert float(empty.detach()) == 0.0


def _left_blob(n: int = 16, size: int = 32) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    x[:, :, 8:24, 2:12] = 0.8
    return x


def _centroid_x(x: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(x.shape[-1], dtype=torch.float32)
    return (x.sum(dim=(1, 2)) * cols).sum(-1) / x.sum(dim=(1, 2, 3)).clamp_min(1e-6)


def test_augmentation_never_flips_by_default_and_stays_small() -> None:
    tc = TrainClassifierConfig()
    x = _left_blob(64)
    out = augment_batch(x, tc, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    cx = _centroid_x(out)
    # The blob's centroid is at x=6.5 of 32: +-5% translation, +-10% scale and +-7 deg keep it in the left third.
    assert float(cx.max()) < 11.0 and float(cx.min()) > 2.0
    assert not torch.allclose(out, x)  # it does augment

    flipped = augment_batch(x, TrainClassifierConfig(hflip=True), torch.Generator().manual_seed(0))
    assert float(_centroid_x(flipped).max()) > 20.0  # with hflip on, some images mirror to the right


def test_augmentation_with_zero_ranges_is_identity() -> None:
    tc = TrainClassifierConfig(aug_rotate_deg=0, aug_scale=0, aug_translate=0, aug_brightness=0, aug_contrast=0)
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(augment_batch(x, tc), x, atol=1e-5, rtol=0)


def test_decode_batch_matches_pipeline_frames_and_skips_bad_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray((np.arange(30 * 50).reshape(30, 50) % 251).astype(np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    missing = tmp_path / "missing.png"
    batch: dict[str, np.ndarray] = {"path": np.array([str(good), str(bad), str(missing)])}
    for name in OBSERVATIONS:
        batch[name] = np.array([1.0, -1.0, np.nan])
    with caplog.at_level(logging.WARNING, logger="chexseg_dist.training"):
        out = decode_batch(batch, image_size=32, uncertain_policy="zeros", blank_policy="ignore")
    assert set(out) == set(BATCH_DTYPES)  # iter_torch_batches(dtypes=...) must name every column
    assert out["ok"].tolist() == [True, False, False]
    expected, _ = frame_from_bytes(good.read_bytes(), 32, str(good))
    np.testing.assert_array_equal(out["image"][0], expected)  # exactly what pseudo-labelling sees
    assert out["image"][1:].max() == 0
    assert out["targets"][:, CARDIO].tolist() == [1.0, 0.0, 0.0]
    assert out["mask"][:, CARDIO].tolist() == [1.0, 1.0, 0.0]
    assert str(bad) in caplog.text and str(missing) in caplog.text


def test_label_table_keeps_frontal_and_names_bad_manifests(data: dict[str, str], tmp_path: Path) -> None:
    table = read_label_table(data["train"], TrainClassifierConfig(), "train")
    assert table.num_rows == 40  # the 3 laterals dropped
    assert table.column_names == ["path", *OBSERVATIONS]
    assert read_label_table(data["train"], TrainClassifierConfig(frontal_only=False), "train").num_rows == 43
    with pytest.raises(FileNotFoundError):
        read_label_table(str(tmp_path / "nope.parquet"), TrainClassifierConfig(), "train")


def test_label_table_refuses_a_manifest_whose_images_are_elsewhere(data: dict[str, str], tmp_path: Path) -> None:
    from chexseg_dist.manifest import manifest_from_csv, write_manifest

    csv_path = Path(data["train"]).with_suffix(".csv")
    moved = str(tmp_path / "moved.parquet")
    write_manifest(manifest_from_csv(str(csv_path), root=str(tmp_path / "wrong-root")), moved)
    with pytest.raises(FileNotFoundError, match=r"moved\.parquet.*--root"):
        read_label_table(moved, TrainClassifierConfig(), "train")


def test_run_location_and_fault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny")
    storage, name = resolve_run(cfg, "/data/out/classifier/")
    assert (storage, name) == ("/data/out/classifier.ray", "classifier")
    cfg = load_config("tiny", overrides=["train_classifier.run_name=r1", "train_classifier.storage_path=s3://b/runs"])
    assert resolve_run(cfg, "s3://b/out/ckpt") == ("s3://b/runs", "r1")
    monkeypatch.setenv("CHEXSEG_FAIL_ONCE_MARKER", "/tmp/marker:3")
    assert FaultInjection.from_env() == FaultInjection("/tmp/marker", 3)


def test_presets() -> None:
    paper = load_config("paper")
    assert (paper.classifier.arch, paper.classifier.image_size) == ("densenet121", 320)
    tc = paper.train_classifier
    assert (tc.lr, tc.batch_size, tc.epochs, tc.lr_schedule) == (1e-4, 16, 3, "constant")
    tiny = load_config("tiny")
    assert (tiny.classifier.arch, tiny.classifier.image_size) == ("tiny_cnn", 128)
    assert not tiny.train_classifier.hflip and not paper.train_classifier.hflip
    with pytest.raises(ValueError, match="lr_schedule"):
        load_config("tiny", overrides=["train_classifier.lr_schedule=step"])


# ---------------------------------------------------------------------------------------------- Ray Train

SMALL = [
    "classifier.image_size=32",
    "train_classifier.batch_size=8",
    "train_classifier.log_every_steps=0",
    "train_classifier.lr=0.003",
]


@pytest.mark.cluster
@pytest.mark.slow
def test_resume_continues_at_next_epoch_and_round_trips(
    ray_cluster: None, data: dict[str, str], tmp_path: Path
) -> None:
    from chexseg_dist.checkpoint import load_classifier, predict_with_cams
    from chexseg_dist.training import train_classifier

    out = str(tmp_path / "ckpt")
    first = train_classifier(
        load_config("tiny", overrides=[*SMALL, "train_classifier.epochs=1"]),
        data["train"],
        data["valid"],
        out,
        verbose=False,
    )
    assert first.start_epoch == 0 and [m["epoch"] for m in first.history] == [0]
    cfg = load_config("tiny", overrides=[*SMALL, "train_classifier.epochs=2"])
    second = train_classifier(cfg, data["train"], data["valid"], out, verbose=False)
    assert second.start_epoch == 1
    assert [m["epoch"] for m in second.history] == [0, 1]
    assert second.starts == [0, 1]
    # The first epoch's numbers survive the resumption unchanged.
    assert second.history[0]["train_loss"] == first.history[0]["train_loss"]
    # 2 undecodable train images were skipped and counted, never trained on.
    assert all(m["skipped_train"] == 2 and m["train_images"] == 38 for m in second.history)
    assert all(m["valid_images"] == 16 for m in second.history)

    saved = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert [m["epoch"] for m in saved["epochs"]] == [0, 1]
    assert saved["best_epoch"] == second.best_epoch
    assert (tmp_path / "ckpt" / "metrics.csv").read_text().count("\n") == 3
    assert "train_classifier" in (tmp_path / "ckpt" / "config.yaml").read_text()

    loaded = load_classifier(out)
    meta = loaded.meta
    assert meta["metrics"]["epoch"] == second.best_epoch
    assert meta["metrics"]["mean_task_auroc"] == pytest.approx(second.best_metrics["mean_task_auroc"])
    assert set(meta["metrics"]["per_task_auroc"]) == set(TASKS)
    assert meta["config"]["train_classifier"]["epochs"] == 2 and meta["image_size"] == 32
    # The disk that marks Cardiomegaly is easy: the classifier must have learnt it.
    assert second.best_metrics["auroc/Cardiomegaly"] > 0.8

    frames = torch.from_numpy(np.stack([frame_from_bytes(_png(i), 32)[0] for i in range(3)]))[:, None]
    probs, cams = predict_with_cams(loaded, frames)
    assert probs.shape == (3, len(OBSERVATIONS)) and cams.shape[:2] == (3, len(OBSERVATIONS))
    assert bool(torch.isfinite(cams).all()) and float(cams.min()) >= 0.0

    # A third run with the same epochs has nothing left to train: it re-exports the same best epoch.
    third = train_classifier(cfg, data["train"], data["valid"], out, verbose=False)
    assert third.start_epoch == 2 and third.best_epoch == second.best_epoch and len(third.history) == 2

    # And the pseudo-labelling job (another stage) accepts the checkpoint as is.
    from chexseg_dist.pseudolabel import run_pseudolabel

    summary = run_pseudolabel(cfg, data["valid"], out, str(tmp_path / "maps.zarr"), printer=lambda _: None)
    assert summary.processed == 16 and summary.failed == 0


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.cluster
@pytest.mark.slow
def test_failed_worker_is_retried_from_the_latest_checkpoint(
    ray_cluster: None, data: dict[str, str], tmp_path: Path
) -> None:
    from chexseg_dist.training import train_classifier

    marker = tmp_path / "failed-once"
    cfg = load_config(
        "tiny",
        overrides=[
            *SMALL,
            "train_classifier.epochs=2",
            "train_classifier.max_failures=1",
            # Two DDP workers: the whole group restarts and the data are split between them.
            "train_classifier.num_workers=2",
            "train_classifier.cpus_per_worker=0.5",
            "train_classifier.decode_cpus=0.5",
        ],
    )
    result = train_classifier(
        cfg,
        data["train"],
        data["valid"],
        str(tmp_path / "ckpt"),
        fault=FaultInjection(str(marker), epoch=1),
        verbose=False,
    )
    assert marker.exists()  # the failure did happen...
    assert result.starts == [0, 1]  # ...and the retried attempt resumed at epoch index 1 from the checkpoint
    assert [m["epoch"] for m in result.history] == [0, 1]
    # 38 decodable rows split equally over 2 workers: every one of them trained on.
    assert all(m["train_images"] == 38 for m in result.history)
    assert os.path.exists(tmp_path / "ckpt" / "checkpoint.json")

    # Without retries the same failure ends the run with an error naming it.
    marker2 = tmp_path / "failed-again"
    cfg0 = load_config("tiny", overrides=[*SMALL, "train_classifier.epochs=1", "train_classifier.max_failures=0"])
    with pytest.raises(RuntimeError, match="injected failure"):
        train_classifier(
            cfg0,
            data["train"],
            data["valid"],
            str(tmp_path / "ckpt0"),
            fault=FaultInjection(str(marker2), epoch=0),
            verbose=False,
        )
