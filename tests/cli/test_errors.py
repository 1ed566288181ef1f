"""Bad input as a new user meets it: one line naming the file, row, id or field and the fix, exit status 2, inputs
byte-identical and nothing half-written left behind. And the other side of the rule: a bug keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import refused, snapshot
from cxp_helpers import make_manifest, write_split
from maps_helpers import image_ids, make_store

from chexseg_dist.cli import main
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data import encode_mask, write_segmentations
from chexseg_dist.models import create_classifier, save_checkpoint


@pytest.fixture()
def dataset(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "data"
    csv_path = write_split(root, "valid", 6, 3)
    return {"root": str(root), "csv": str(csv_path), "manifest": make_manifest(csv_path)}


def _checkpoint(path: Path) -> str:
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", widths=(8, 16))
    return save_checkpoint(str(path), model, arch="tiny_cnn", image_size=32, config={})


def test_manifest_out_equal_to_its_csv_keeps_the_csv(
    dataset: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(tmp_path)
    refused(["manifest", "--csv", dataset["csv"], "--out", dataset["csv"]], capsys, "--out", "input --csv")
    assert snapshot(tmp_path) == before


def test_manifest_out_must_be_a_parquet_file_not_a_folder(
    dataset: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "existing.parquet"
    folder.mkdir()
    before = snapshot(tmp_path)
    refused(["manifest", "--csv", dataset["csv"], "--out", str(tmp_path / "m.csv")], capsys, ".parquet")
    refused(["manifest", "--csv", dataset["csv"], "--out", str(folder)], capsys, "existing folder")
    assert snapshot(tmp_path) == before


def test_a_store_path_that_is_a_file_is_refused_and_nothing_is_left(
    dataset: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    store = tmp_path / "notes.txt"
    store.write_text("my notes")
    before = snapshot(tmp_path)
    argv = ["pseudolabel", "--manifest", dataset["manifest"], "--checkpoint", ckpt, "--store", str(store)]
    refused(argv, capsys, str(store), "not a folder")
    assert snapshot(tmp_path) == before  # no sidecar, the file untouched


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_checkpoint_with_missing_or_unreadable_weights_is_one_line_and_leaves_nothing(
    damage: str, dataset: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = Path(_checkpoint(tmp_path / "ckpt"))
    if damage == "missing":
        (ckpt / "model.pt").unlink()
    else:
        (ckpt / "model.pt").write_bytes(b"not a torch file at all")
    before = snapshot(tmp_path)
    argv = ["pseudolabel", "--manifest", dataset["manifest"], "--checkpoint", str(ckpt)]
    refused([*argv, "--store", str(tmp_path / "maps.zarr")], capsys, "model.pt")
    assert snapshot(tmp_path) == before  # no store, no sidecar, no log


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"train_classifier: [unclosed", "not valid YAML"),
        (b"\xff\xfe\x00 binary", "not UTF-8"),
        (b"- just\n- a list\n", "expected a mapping"),
        (None, "cannot be read"),  # a folder
    ],
)
def test_bad_config_files_are_named(
    content: bytes | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    refused(["config", "--config", str(path)], capsys, f"config file {path}", expected)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    refused(["config", "--set", f"train_classifier.lr={value}"], capsys, "train_classifier.lr", "finite")


def test_a_non_finite_number_in_a_config_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("train_classifier:\n  lr: .nan\n")
    refused(["config", "--config", str(path)], capsys, "train_classifier.lr", "finite")


def _gt(path: Path, ids: list[str], size: tuple[int, int]) -> str:
    empty = encode_mask(np.zeros(size, dtype=bool))
    write_segmentations(str(path), {i: dict.fromkeys(TASKS, empty) for i in ids})
    return str(path)


def test_evaluate_out_that_is_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = _gt(tmp_path / "gt.json", ["a_b_c"], (8, 8))
    out = tmp_path / "report"
    out.write_text("my report")
    before = snapshot(tmp_path)
    refused(["evaluate", "--gt", gt, "--pred", gt, "--out", str(out)], capsys, "existing file")
    assert snapshot(tmp_path) == before


def test_tune_thresholds_names_the_gt_file_whose_ids_the_store_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40)]
    store = make_store(str(tmp_path / "maps.zarr"), rng.random((2, len(TASKS), 4, 4)).astype(np.float32), sizes, 32).uri
    gt = _gt(tmp_path / "other_gt.json", [*image_ids(1), "patient99999_study1_view1_frontal"], (40, 30))
    before = snapshot(tmp_path)
    argv = ["tune-thresholds", "--store", store, "--gt", gt, "--out", str(tmp_path / "t.json"), "--workers", "1"]
    refused(argv, capsys, f"--gt {gt}", "patient99999_study1_view1_frontal")
    assert snapshot(tmp_path) == before


def test_training_on_a_manifest_whose_images_are_elsewhere_is_refused_before_ray(
    dataset: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.data import manifest_from_csv, write_manifest

    moved = str(tmp_path / "moved.parquet")
    write_manifest(manifest_from_csv(dataset["csv"], root=str(tmp_path / "wrong-root")), moved)
    before = snapshot(tmp_path)
    out = str(tmp_path / "ckpt")
    refused(["train-classifier", "--train", moved, "--valid", moved, "--out", out], capsys, "moved.parquet", "--root")
    assert snapshot(tmp_path) == before  # no checkpoint folder, no log, no Ray run


def test_a_bug_keeps_its_traceback_while_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An internal ValueError or KeyError is a bug, not bad input: the CLI lets it propagate with its traceback."""
    import chexseg_dist.cli.config as config_command

    def broken(args: object) -> int:
        raise KeyError("internal lookup that should never fail")

    monkeypatch.setattr(config_command, "run", broken)
    with pytest.raises(KeyError, match="internal lookup"):
        main(["config"])
    monkeypatch.undo()
    refused(["config", "--set", "masks.strategy=magic"], capsys, "masks.strategy", "otsu")


def test_outputs_are_published_whole(tmp_path: Path) -> None:
    """A write that fails half-way leaves neither a partial file nor a temporary one (fsio.open_file)."""
    from chexseg_dist.core import fsio

    target = tmp_path / "out.json"
    target.write_text('{"old": true}')
    with pytest.raises(RuntimeError), fsio.open_file(str(target), "w") as f:
        f.write('{"new": ')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
