"""Classifier training without Ray: loss, augmentation, the decode stage's failure policy, the view rule, inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cxp_helpers import CARDIO
from PIL import Image

from chexseg_dist.config import TrainClassifierConfig, load_config
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.data import decode_frames, frame_from_bytes, read_failure_tables
from chexseg_dist.errors import InputNotFoundError
from chexseg_dist.train import FaultInjection, augment_batch, resolve_run
from chexseg_dist.train.classifier import BATCH_DTYPES, label_targets, masked_bce_with_logits, read_label_table

# ------------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def data(cxp_world: dict[str, str]) -> dict[str, str]:
    return cxp_world


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


def test_training_frames_are_the_pipeline_frames_and_bad_files_are_left_out_and_recorded(tmp_path: Path) -> None:
    """The training stage is the one decode stage: same frames, same failure policy (any read error, not just
    undecodable bytes, is recorded with its row and reason and the image left out; none kills the task)."""
    good = tmp_path / "good.png"
    Image.fromarray((np.arange(30 * 50).reshape(30, 50) % 251).astype(np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    missing = tmp_path / "missing.png"
    folder = tmp_path / "a_folder.png"  # a read error that is not a decode error
    folder.mkdir()
    paths = [good, bad, missing, folder]
    batch: dict[str, np.ndarray] = {
        "row": np.arange(4, dtype=np.int64) + 10,
        "image_id": np.array([f"img{i}" for i in range(4)]),
        "path": np.array([str(p) for p in paths]),
    }
    for name in OBSERVATIONS:
        batch[name] = np.array([1.0, -1.0, np.nan, 0.0])
    failures = tmp_path / "failures"
    decoded = decode_frames(batch, image_size=32, keep_failed=False, failures_dir=str(failures), run_id="r1")
    out = label_targets(decoded, uncertain_policy="zeros", blank_policy="ignore")
    assert set(out) == set(BATCH_DTYPES)  # iter_torch_batches(dtypes=...) must name every column
    assert out["image"].shape == (1, 32, 32)  # only the decodable image reaches the loop
    expected, _ = frame_from_bytes(good.read_bytes(), 32, str(good))
    np.testing.assert_array_equal(out["image"][0], expected)  # exactly what pseudo-labelling sees
    assert out["targets"][0, CARDIO] == 1.0 and out["mask"][0, CARDIO] == 1.0
    table = read_failure_tables(str(failures))
    assert table is not None
    records = {r["row"]: r for r in table.to_pylist()}
    assert sorted(records) == [11, 12, 13]
    assert records[11]["stage"] == "decode" and str(bad) in records[11]["error"]
    assert records[12]["stage"] == "read" and "no such file" in records[12]["error"]
    assert records[13]["stage"] == "read" and "directory" in records[13]["error"]
    assert {r["run_id"] for r in records.values()} == {"r1"}


def test_every_stage_treats_unknown_views_the_same() -> None:
    """One view rule: a row of unknown view is kept as frontal by training and pseudo-labelling alike."""
    import pyarrow as pa

    from chexseg_dist.data import select_views
    from chexseg_dist.pseudolabel import select_images

    table = pa.table(
        {
            "row": [0, 1, 2],
            "image_id": ["a", "b", "c"],
            "path": ["/x/a.png", "/x/b.png", "/x/c.png"],
            "frontal": pa.array([True, False, None], pa.bool_()),
        }
    )
    views = select_views(table, frontal_only=True)
    assert views.table.column("image_id").to_pylist() == ["a", "c"]
    assert (views.frontal, views.unknown, views.lateral_dropped) == (1, 1, 1)
    assert "1 image(s) of unknown view kept as frontal" in (views.note("x") or "")
    images, _ = select_images(table, frontal_only=True)
    assert images.column("image_id").to_pylist() == ["a", "c"]


def test_label_table_keeps_frontal_and_names_bad_manifests(data: dict[str, str], tmp_path: Path) -> None:
    table = read_label_table(data["train"], TrainClassifierConfig(), "train")
    assert table.num_rows == 40  # the 3 laterals dropped
    assert table.column_names == ["row", "image_id", "path", *OBSERVATIONS]
    assert read_label_table(data["train"], TrainClassifierConfig(frontal_only=False), "train").num_rows == 43
    with pytest.raises(InputNotFoundError, match=r"nope\.parquet"):
        read_label_table(str(tmp_path / "nope.parquet"), TrainClassifierConfig(), "train")


def test_label_table_refuses_a_manifest_whose_images_are_elsewhere(data: dict[str, str], tmp_path: Path) -> None:
    from chexseg_dist.data.manifest import write_manifest
    from chexseg_dist.data.sources import manifest_from_csv

    csv_path = Path(data["train"]).with_suffix(".csv")
    moved = str(tmp_path / "moved.parquet")
    write_manifest(manifest_from_csv(str(csv_path), root=str(tmp_path / "wrong-root")), moved)
    with pytest.raises(InputNotFoundError, match=r"moved\.parquet.*--root"):
        read_label_table(moved, TrainClassifierConfig(), "train")


def test_run_location_and_fault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("tiny")
    storage, name = resolve_run(cfg.train_classifier, "/data/out/classifier/", "classifier")
    assert (storage, name) == ("/data/out/classifier.ray", "classifier")
    cfg = load_config("tiny", overrides=["train_classifier.run_name=r1", "train_classifier.storage_path=s3://b/runs"])
    assert resolve_run(cfg.train_classifier, "s3://b/out/ckpt", "classifier") == ("s3://b/runs", "r1")
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
