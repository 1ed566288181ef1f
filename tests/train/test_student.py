"""The student's data and checks without a Ray cluster: the expert split, masks in the student's frame, pseudo-masks
derived on the fly, the worker shares of the store, output-threshold counting, distillation's target, and every bad
input refused before training starts (one line naming the file, id or field, exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import refused
from PIL import Image
from student_helpers import SMALL_STUDENT, write_random_store

from chexseg_dist.config import load_config
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import decode_mask, encode_mask, read_segmentations, write_segmentations
from chexseg_dist.data.expert import expert_targets, load_expert_set, read_annotations
from chexseg_dist.data.frames import decode_frames
from chexseg_dist.data.labels import label_column
from chexseg_dist.data.manifest import read_manifest
from chexseg_dist.errors import AnnotationError, CheckpointError, ConfigError, InputError, StoreError
from chexseg_dist.masks.gating import task_values
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.models.segmentation import create_segmentation, save_segmentation
from chexseg_dist.train._loop import WorkerContext
from chexseg_dist.train.losses import distillation_loss
from chexseg_dist.train.pseudo_set import load_pseudo_set, pseudo_targets, read_chunk
from chexseg_dist.train.segmentation import SegmentationTask, StudentInputs

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(student_world: dict[str, str]) -> dict[str, str]:
    return student_world


def inputs(world: dict[str, str], **kw: object) -> StudentInputs:
    base: dict[str, object] = {
        "expert_manifest": world["valid"],
        "expert_annotations": world["expert"],
        "pseudo_store": world["store"],
        "pseudo_manifest": world["train"],
        "holdout_manifest": world["test"],
    }
    base.update(kw)
    return StudentInputs(**base)  # type: ignore[arg-type]


def task(world: dict[str, str], *overrides: str, **kw: object) -> SegmentationTask:
    cfg = load_config("tiny", overrides=[*SMALL_STUDENT, *overrides])
    return SegmentationTask(cfg, inputs(world, **kw), failures_dir="/nonexistent", run_id="t")


# ------------------------------------------------------------------------------------------------ the expert set
def test_the_expert_split_is_patient_disjoint_seeded_and_the_size_limit_keeps_the_selection(
    world: dict[str, str],
) -> None:
    a = load_expert_set(world["valid"], world["expert"], select_fraction=0.25, seed=1)
    b = load_expert_set(world["valid"], world["expert"], select_fraction=0.25, seed=1)
    c = load_expert_set(world["valid"], world["expert"], select_fraction=0.25, seed=2)
    patients = lambda t: set(t.column("patient_id").to_pylist())  # noqa: E731
    assert not patients(a.train) & patients(a.select)
    assert a.train.num_rows + a.select.num_rows == read_manifest(world["valid"]).num_rows
    assert a.select.column("image_id").to_pylist() == b.select.column("image_id").to_pylist()
    assert a.select.column("image_id").to_pylist() != c.select.column("image_id").to_pylist()
    assert round(0.25 * len(patients(a.train) | patients(a.select))) == len(patients(a.select))
    limited = load_expert_set(world["valid"], world["expert"], 0.25, 1, limit_train=5)
    assert limited.select.column("image_id").to_pylist() == a.select.column("image_id").to_pylist()
    assert limited.train.column("image_id").to_pylist() == a.train.column("image_id").to_pylist()[:5]


def test_polygon_expert_files_are_told_from_segmentation_files_by_their_entries(
    world: dict[str, str], tmp_path: Path
) -> None:
    data = Path(world["data"])
    # The annotator's polygons, rasterised, are its own RLE masks.
    as_polygons = read_annotations(str(data / "expert_annotations_valid.json"))
    as_rles = read_annotations(str(data / "expert_segmentations_valid.json"))
    assert as_polygons.keys() == as_rles.keys()
    for image_id, tasks in as_rles.items():
        for task, rle in tasks.items():
            assert np.array_equal(decode_mask(as_polygons[image_id][task]), decode_mask(rle)), (image_id, task)
    # A first entry whose polygons fill more than the first 4 KB (keys sorted: img_size comes after them).
    polygons = json.loads((data / "expert_annotations_valid.json").read_text())
    first = next(iter(polygons))
    h, w = polygons[first]["img_size"]
    ring = [[float(x % w), float((x * 7) % h)] for x in range(800)]
    polygons[first] = {"Airspace Opacity": [ring], "img_size": [h, w]}
    big = tmp_path / "big_first.json"
    big.write_text(json.dumps(polygons, sort_keys=True))
    assert big.read_text().index('"img_size"') > 4096
    assert read_annotations(str(big))[first]["Airspace Opacity"]["size"] == [h, w]


@pytest.mark.parametrize("shape", [(90, 200), (200, 70), (64, 64)])
def test_an_expert_mask_in_the_students_frame_lines_up_with_its_image(tmp_path: Path, shape: tuple[int, int]) -> None:
    h, w = shape
    image = np.zeros((h, w), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 5 : h // 2, w // 3 : (4 * w) // 5] = True  # off-centre, so a flip or transposition would show
    image[mask] = 255
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    entry = {t: encode_mask(mask if t == "Edema" else np.zeros_like(mask)) for t in TASKS}
    batch = {
        "path": np.asarray([str(path)]),
        "row": np.asarray([0]),
        "image_id": np.asarray(["x"]),
        "masks_json": np.asarray([json.dumps(entry)]),
    }
    out = expert_targets(decode_frames(batch, image_size=64, keep_failed=False))
    frame_mask = out["masks"][0, TASKS.index("Edema")].astype(bool)
    bright = out["frame"][0] > 127
    iou = (frame_mask & bright).sum() / (frame_mask | bright).sum()
    assert iou > 0.9, iou
    assert out["masks"][0].sum() == frame_mask.sum()  # the other pathologies stay empty


# ------------------------------------------------------------------------------------------------ the pseudo set
def test_pseudo_masks_at_the_students_size_equal_maskmaker_at_that_size(world: dict[str, str]) -> None:
    pseudo = load_pseudo_set(world["store"], world["train"])
    share = pseudo.rows.slice(0, 6)
    batch = {name: share.column(name).to_numpy(zero_copy_only=False) for name in share.column_names}
    batch = read_chunk(batch, world["store"])
    size = 64  # the classifier's frame was 128: the student's differs
    decoded = decode_frames(batch, image_size=size, keep_failed=False)
    maker = MaskMaker.from_config(load_config("tiny", overrides=["masks.label_gating=true"]).masks)
    out = pseudo_targets(decoded, maker, ignore_uncertain=True)
    labels = np.stack([label_column(decoded, name) for name in OBSERVATIONS], axis=1)
    for i in range(len(out["image_id"])):
        h, w = (int(v) for v in decoded["letterbox"][i][:2])
        expected = maker.masks(decoded["cams"][i], Letterbox(h, w, size), decoded["probs"][i], labels[i], "model")
        assert out["masks"][i].shape == (N_TASKS, size, size)
        assert np.array_equal(out["masks"][i].astype(bool), expected)
    # ignore_uncertain: weight 0 exactly where the image's label is uncertain.
    assert np.array_equal(out["weights"] == 0, task_values(labels) == -1)
    assert pseudo.failed == 0 and pseudo.pending == 0 and len(pseudo) == read_manifest(world["train"]).num_rows


def test_the_students_pseudo_masks_are_gated_by_its_own_setting_not_the_export_one(world: dict[str, str]) -> None:
    # The pseudo-labelled images' labels gate their masks by default, whatever masks.label_gating (which serves
    # export-masks and overlays) says; train_segmentation.label_gating=false turns it off.
    gated = task(world, "masks.label_gating=false")
    gated.prepare()
    assert gated.maker is not None and gated.maker.label_gating
    plain = task(world, "masks.label_gating=true", "train_segmentation.label_gating=false")
    plain.prepare()
    assert plain.maker is not None and not plain.maker.label_gating


def test_workers_get_whole_chunks_dealt_in_turn_and_chunks_are_cut_when_there_are_fewer_than_workers(
    world: dict[str, str],
) -> None:
    pseudo = load_pseudo_set(world["store"], world["train"])  # 8 images per chunk
    shares = pseudo.shares(2)
    for rank, share in enumerate(shares):
        for table in share:
            chunks = set((np.asarray(table.column("slot")) // 8).tolist())
            assert len(chunks) == 1 and chunks.pop() % 2 == rank
    slots = sorted(s for share in shares for t in share for s in t.column("slot").to_pylist())
    assert slots == list(range(len(pseudo)))
    one_chunk = type(pseudo)(pseudo.store, pseudo.rows.slice(0, 8), 8, 0, 0)
    cut = one_chunk.shares(3)
    assert all(len(share) == 1 for share in cut)
    assert sorted(s for share in cut for t in share for s in t.column("slot").to_pylist()) == list(range(8))


def test_a_store_of_another_manifest_or_without_done_rows_is_refused(world: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"was not written for .*valid.parquet"):
        load_pseudo_set(world["store"], world["valid"])
    empty = str(tmp_path / "empty.zarr")
    n = read_manifest(world["train"]).num_rows
    write_random_store(empty, world["train"], 0, done=np.zeros(n, dtype=bool))
    with pytest.raises(StoreError, match=r"has no done row; run chexseg pseudolabel"):
        load_pseudo_set(empty, world["train"])
    some = str(tmp_path / "some.zarr")
    write_random_store(some, world["train"], 0, done=np.arange(n) % 2 == 0)
    partial = load_pseudo_set(some, world["train"])
    assert len(partial) == (n + 1) // 2 and partial.pending == n // 2


# ------------------------------------------------------------------------------------------------ distillation
def test_distills_target_is_the_teachers_sigmoid_at_temperature_t(world: dict[str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = create_segmentation("deeplabv3plus", "resnet18").eval()
    path = save_segmentation(str(tmp_path / "teacher"), teacher, image_size=64, thresholds=[0.5] * 10, config={})
    t = task(world, "train_segmentation.mode=distill", f"train_segmentation.teacher={path}")
    t.prepare()
    student = create_segmentation("deeplabv3plus", "resnet18").train()
    images = torch.randint(0, 255, (2, 64, 64), dtype=torch.uint8)
    batch = {"image": images, "weights": torch.ones(2, N_TASKS), "ids": ["a", "b"], "experts": 0}
    ctx = WorkerContext(rank=0, world=1, device=torch.device("cpu"), epoch=0, generator=torch.Generator())
    torch.manual_seed(5)
    result = t.train_step(student, batch, ctx)
    x = images.unsqueeze(1).float() / 255.0
    torch.manual_seed(5)
    with torch.no_grad():
        expected = distillation_loss(student(x), teacher(x), 10.0)
    assert torch.allclose(result.loss.detach(), expected, atol=1e-6)
    assert result.parts["pseudo_rows"] == 2 and result.ids == ["a", "b"]


# ------------------------------------------------------------------------------------------------ bad input
def _write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_bad_expert_annotations_name_the_file_and_the_image(world: dict[str, str], tmp_path: Path) -> None:
    gt = read_segmentations(world["expert"])
    ids = sorted(gt)
    missing_image = {k: v for k, v in gt.items() if k != ids[0]}
    f1 = tmp_path / "missing_image.json"
    write_segmentations(str(f1), missing_image)
    with pytest.raises(AnnotationError, match=rf"missing_image.json: no expert masks for 1 image.*{ids[0]}"):
        task(world, expert_annotations=str(f1)).prepare()
    missing_task = {k: dict(v) for k, v in gt.items()}
    del missing_task[ids[1]]["Edema"]
    f2 = tmp_path / "missing_task.json"
    write_segmentations(str(f2), missing_task)
    with pytest.raises(AnnotationError, match=rf"missing_task.json, image '{ids[1]}': missing pathology.*Edema"):
        task(world, expert_annotations=str(f2)).prepare()
    wrong_size = {k: dict(v) for k, v in gt.items()}
    wrong_size[ids[2]] = {t: encode_mask(np.zeros((10, 12), dtype=bool)) for t in TASKS}
    f3 = tmp_path / "wrong_size.json"
    write_segmentations(str(f3), wrong_size)
    with pytest.raises(AnnotationError, match=rf"wrong_size.json, image '{ids[2]}': masks are 10x12 but"):
        task(world, expert_annotations=str(f3)).prepare()


def test_a_patient_in_two_sets_is_refused_naming_both(world: dict[str, str]) -> None:
    with pytest.raises(InputError, match=r"patient.*in both expert-train and test"):
        task(world, holdout_manifest=world["valid"]).prepare()
    with pytest.raises(StoreError, match=r"was not written for"):
        task(world, pseudo_manifest=world["valid"], pseudo_store=world["store"]).prepare()


def test_the_config_refuses_what_cannot_train(world: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mode=semi with expert_ratio=1.0 is mode full"):
        load_config("tiny", overrides=["train_segmentation.expert_ratio=1"])
    with pytest.raises(ConfigError, match=r"mode=semi with expert_ratio=0.0 is mode weak"):
        load_config("tiny", overrides=["train_segmentation.expert_ratio=0"])
    with pytest.raises(ConfigError, match=r"round\(expert_ratio=0.9 x batch_size=4\) = 4"):
        task(world, "train_segmentation.expert_ratio=0.9").prepare()
    with pytest.raises(ConfigError, match=r"masks.strategy=tuned needs a thresholds file"):
        task(world, "masks.strategy=tuned").prepare()
    with pytest.raises(ConfigError, match=r"mode=weak trains on the pseudo-labelled set: pass --pseudo-store"):
        task(world, "train_segmentation.mode=weak", pseudo_store="").prepare()
    with pytest.raises(ConfigError, match=r"mode=distill needs a teacher"):
        task(world, "train_segmentation.mode=distill").prepare()
    torch.manual_seed(0)
    other = create_segmentation("unet", "resnet18")
    path = save_segmentation(str(tmp_path / "unet"), other, image_size=64, thresholds=[0.5] * 10, config={})
    expected = r"teacher=.*unet/resnet18 at 64 px but the student is deeplabv3plus/resnet18"
    with pytest.raises(CheckpointError, match=expected):
        task(world, "train_segmentation.mode=distill", f"train_segmentation.teacher={path}").prepare()


def test_the_cli_refuses_bad_student_input_in_one_line(
    world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train-segmentation", "--expert-manifest", world["valid"], "--expert-annotations", world["expert"],
            "--out", str(tmp_path / "s")]  # fmt: skip
    refused([*base, "--set", "train_segmentation.expert_ratio=1"], capsys, "train_segmentation.mode=semi", "mode full")
    refused([*base, "--mode", "weak"], capsys, "--pseudo-store")
    refused([*base, "--mode", "full", "--test", world["valid"]], capsys, "in both expert-train and test", "patient")
    assert not (tmp_path / "s").exists()  # refused before anything was written
    # The experiment compares modes at equal optimizer steps: "one pass over each mode's rows" is refused.
    experiment = ["experiment", "--data", world["data"], "--out", str(tmp_path / "e")]
    refused([*experiment, "--set", "train_segmentation.steps_per_epoch=0"], capsys, "steps_per_epoch")
    assert not (tmp_path / "e").exists()
