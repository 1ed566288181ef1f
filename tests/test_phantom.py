"""The phantom generator: determinism, CheXpert/CheXlocalize formats, masks that match labels and pixels."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from scipy import ndimage

from chexseg_dist import phantom
from chexseg_dist.annotations import polygons_to_mask
from chexseg_dist.cli import main
from chexseg_dist.config import SynthConfig, load_config
from chexseg_dist.images import decode_image
from chexseg_dist.pathologies import CSV_HEADER, OBSERVATIONS, TASKS, observation_for_task

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 8, "n_valid": 6, "n_test": 4, "size": 128, "lateral_fraction": 0.3, "odd_mode_fraction": 0.1}
CELLS = {"1.0", "0.0", "-1.0", ""}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "a"
    phantom.generate(str(out), SynthConfig(seed=7, **SMALL))
    return out


def _render(seed: int, present: dict[str, float], size: int = 160) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same patient, pose and exposure, with the given findings drawn."""
    anat = phantom.sample_anatomy(np.random.default_rng(1000 + seed))
    study = phantom.Study(present=dict(present), ap=False)
    img, masks, _ = phantom.render_study(np.random.default_rng(seed), anat, study, size)
    return img, masks


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset: Path, tmp_path: Path) -> None:
    phantom.generate(str(tmp_path), SynthConfig(seed=7, workers=2, **SMALL))
    a, b = _files(dataset), _files(tmp_path)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == []
    assert any(name.endswith(".jpg") for name in a) and "gt_segmentations_valid.json" in a


def test_workers_that_cannot_start_give_an_error_not_a_hang(tmp_path: Path) -> None:
    # A program read from stdin cannot be re-imported by spawned workers: they die at start-up. A
    # multiprocessing.Pool would replace them forever; the generator must stop with a message instead.
    script = (
        "from chexseg_dist import phantom\n"
        "from chexseg_dist.config import SynthConfig\n"
        f"phantom.generate({str(tmp_path)!r}, SynthConfig(seed=7, workers=2, **{SMALL!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=180, cwd=str(REPO)
    )
    assert out.returncode != 0
    assert "phantom generator: a worker process died" in out.stderr and "run it from a file" in out.stderr


def test_different_seed_gives_different_data(dataset: Path, tmp_path: Path) -> None:
    phantom.generate(str(tmp_path), SynthConfig(seed=8, **SMALL))
    a, b = _files(dataset), _files(tmp_path)
    for name in ("train.csv", "valid.csv", "gt_segmentations_valid.json", "gt_annotations_test.json"):
        assert a[name] != b[name], name
    first = "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    assert a[first] != b[first]


# ------------------------------------------------------------------------------------------------ CheXpert CSVs
def test_csvs_have_the_chexpert_header_cells_and_paths(dataset: Path) -> None:
    for split in phantom.SPLITS:
        header, rows = _read_csv(dataset / f"{split}.csv")
        assert tuple(header) == CSV_HEADER
        assert len([r for r in rows if r["Frontal/Lateral"] == "Frontal"]) == SMALL[f"n_{split}"]
        for row in rows:
            assert row["Path"].startswith(f"CheXpert-v1.0-small/{split}/patient")
            assert (dataset / row["Path"]).is_file(), row["Path"]
            assert row["Sex"] in ("Male", "Female") and 18 <= int(row["Age"]) <= 90
            assert row["Frontal/Lateral"] in ("Frontal", "Lateral")
            assert row["AP/PA"] in (("AP", "PA") if row["Frontal/Lateral"] == "Frontal" else ("",))
            labels = [row[o] for o in OBSERVATIONS]
            assert set(labels) <= (CELLS if split == "train" else {"1.0", "0.0"}), row
            others = [row[o] for o in OBSERVATIONS[1:]]
            if row["No Finding"] == "1.0":  # only when nothing else is positive or uncertain
                assert "1.0" not in others and "-1.0" not in others, row
            if split != "train":
                assert row["No Finding"] == ("0.0" if "1.0" in others else "1.0"), row
    _, train = _read_csv(dataset / "train.csv")
    assert any(r["Frontal/Lateral"] == "Lateral" for r in train)
    # Several studies of one patient appear in train.
    patients = [r["Path"].split("/")[2] for r in train if r["Frontal/Lateral"] == "Frontal"]
    assert len(set(patients)) < len(patients)


def test_odd_file_modes_are_present_and_decode(dataset: Path) -> None:
    _, rows = _read_csv(dataset / "train.csv")
    modes: dict[str, list[str]] = {}
    for row in rows:
        with Image.open(dataset / row["Path"]) as im:
            modes.setdefault(im.mode, []).append(row["Path"])
    assert {"L", "RGB", "I;16"} <= set(modes), modes
    for mode in ("RGB", "I;16"):
        path = dataset / modes[mode][0]
        pixels = decode_image(path.read_bytes(), str(path))
        with Image.open(path) as im:
            assert pixels.shape == (im.height, im.width)
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and pixels.std() > 0.05
    assert all(p.endswith(".png") for p in modes["I;16"])


def test_lateral_views_share_the_study_labels(dataset: Path) -> None:
    _, rows = _read_csv(dataset / "train.csv")
    by_study = {r["Path"].rsplit("/", 1)[0]: r for r in rows if r["Frontal/Lateral"] == "Frontal"}
    laterals = [r for r in rows if r["Frontal/Lateral"] == "Lateral"]
    assert laterals
    for lat in laterals:
        assert lat["Path"].endswith("view2_lateral.jpg")
        frontal = by_study[lat["Path"].rsplit("/", 1)[0]]
        assert [lat[o] for o in OBSERVATIONS] == [frontal[o] for o in OBSERVATIONS]


# ------------------------------------------------------------------------------------------------ ground truth
@pytest.mark.parametrize("split", ["valid", "test"])
def test_ground_truth_masks_agree_with_labels_images_and_polygons(dataset: Path, split: str) -> None:
    _, rows = _read_csv(dataset / f"{split}.csv")
    segs = json.loads((dataset / f"gt_segmentations_{split}.json").read_text())
    polys = json.loads((dataset / f"gt_annotations_{split}.json").read_text())
    assert len(segs) == len(rows) == len(polys)
    n_positive = 0
    for row in rows:
        image_id = "_".join(row["Path"].rsplit(".", 1)[0].split("/")[-3:])
        assert sorted(segs[image_id]) == sorted(TASKS)
        with Image.open(dataset / row["Path"]) as im:
            shape = (im.height, im.width)
        assert polys[image_id]["img_size"] == list(shape)
        for task in TASKS:
            rle = segs[image_id][task]
            assert isinstance(rle["counts"], str) and rle["size"] == list(shape)
            mask = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == shape
            positive = row[observation_for_task(task)] == "1.0"
            assert bool(mask.any()) == positive, (image_id, task)
            assert (task in polys[image_id]) == positive, (image_id, task)
            if positive:
                n_positive += 1
                drawn = polygons_to_mask(polys[image_id][task], *shape)
                assert np.array_equal(drawn, mask), (image_id, task)
        if row["Enlarged Cardiomediastinum"] == "1.0" and row["Cardiomegaly"] == "1.0":
            ecm, heart = (coco_mask.decode({**segs[image_id][t], "counts": segs[image_id][t]["counts"].encode()})
                          for t in ("Enlarged Cardiomediastinum", "Cardiomegaly"))  # fmt: skip
            assert not (heart & ~ecm).any()
    assert n_positive > 0


def test_train_masks_are_written_on_request(tmp_path: Path) -> None:
    phantom.generate(str(tmp_path), SynthConfig(seed=1, n_train=3, n_valid=0, n_test=0, size=96, train_masks=True))
    segs = json.loads((tmp_path / "gt_segmentations_train.json").read_text())
    _, rows = _read_csv(tmp_path / "train.csv")
    assert len(segs) == len([r for r in rows if r["Frontal/Lateral"] == "Frontal"])
    for row in rows:
        if row["Frontal/Lateral"] != "Frontal":
            continue
        entry = segs["_".join(row["Path"].rsplit(".", 1)[0].split("/")[-3:])]
        for task in TASKS:  # a 1.0 in train always has a drawn, non-empty mask
            if row[observation_for_task(task)] == "1.0":
                m = coco_mask.decode({**entry[task], "counts": entry[task]["counts"].encode()})
                assert m.any(), task


def test_enlarged_cardiomediastinum_contains_the_heart() -> None:
    for seed in range(4):
        _, masks = _render(seed, {"Cardiomegaly": 0.6, "Enlarged Cardiomediastinum": 0.4})
        heart, ecm = masks["Cardiomegaly"], masks["Enlarged Cardiomediastinum"]
        assert heart.any() and not (heart & ~ecm).any()
        assert ecm.sum() > 1.2 * heart.sum()  # and the widened mediastinum above it


# ------------------------------------------------------------------------------------------------ pixels
# finding -> (task of its mask, sign of the intensity change inside the mask)
EFFECTS = {
    "Lung Lesion": ("Lung Lesion", 1),
    "_patchy": ("Airspace Opacity", 1),
    "Edema": ("Edema", 1),
    "Consolidation": ("Consolidation", 1),
    "Atelectasis": ("Atelectasis", 1),
    "Pneumothorax": ("Pneumothorax", -1),
    "Pleural Effusion": ("Pleural Effusion", 1),
    "Support Devices": ("Support Devices", 1),
    "Cardiomegaly": ("Cardiomegaly", 1),
    "Enlarged Cardiomediastinum": ("Enlarged Cardiomediastinum", 1),
}


@pytest.mark.parametrize("finding", sorted(EFFECTS))
def test_a_finding_changes_the_pixels_inside_its_mask(finding: str) -> None:
    task, sign = EFFECTS[finding]
    healthy, _ = _render(3, {})
    sick, masks = _render(3, {finding: 0.7})
    mask = masks[task]
    assert mask.any()
    diff = sick - healthy
    inside = float(diff[mask].mean()) * sign
    far = ~ndimage.binary_dilation(mask, iterations=8)
    outside = float(np.abs(diff[far]).mean())
    assert inside > 0.03, inside
    assert outside < inside / 5, (inside, outside)


def test_effusion_is_brighter_than_the_healthy_lung_and_fainter_when_less_conspicuous() -> None:
    gains = []
    for consp in (0.5, 1.0):
        gain = []
        for seed in range(3):
            anat = phantom.sample_anatomy(np.random.default_rng(50 + seed))
            imgs = []
            for present in ({}, {"Pleural Effusion": 0.6}):
                study = phantom.Study(present=dict(present), ap=False)
                img, masks, _ = phantom.render_study(np.random.default_rng(seed), anat, study, 160, consp)
                imgs.append(img)
            m = masks["Pleural Effusion"]
            gain.append(float(imgs[1][m].mean() - imgs[0][m].mean()))
        gains.append(np.mean(gain))
    assert gains[1] > 0.1
    assert 0 < gains[0] < gains[1]


def test_pneumothorax_has_no_lung_markings() -> None:
    ratios = []
    for seed in range(4):
        healthy, _ = _render(seed, {}, size=256)
        sick, masks = _render(seed, {"Pneumothorax": 0.9}, size=256)
        core = ndimage.binary_erosion(masks["Pneumothorax"], iterations=3)  # away from the pleural line
        assert core.sum() > 100

        detail = [float((img - ndimage.gaussian_filter(img, 1.5))[core].std()) for img in (sick, healthy)]
        ratios.append(detail[0] / detail[1])
        assert sick[core].mean() < healthy[core].mean() - 0.02  # and darker: pure air
    # Ribs and noise remain, vessels and parenchyma go: about 0.85 here, 1.0 if the markings were left in.
    assert np.mean(ratios) < 0.93, ratios


def test_images_vary_in_size_around_the_configured_size(dataset: Path) -> None:
    _, rows = _read_csv(dataset / "train.csv")
    shapes = set()
    for row in rows:
        with Image.open(dataset / row["Path"]) as im:
            shapes.add(im.size)
            assert 0.7 * 128 <= max(im.size) <= 1.3 * 128 and 0.75 <= im.height / im.width <= 1.3
    assert len(shapes) > 3


# ------------------------------------------------------------------------------------------------ labels
def test_train_label_prevalence_is_chexpert_like(tmp_path: Path) -> None:
    meta = phantom.generate(str(tmp_path), SynthConfig(seed=0, n_train=300, n_valid=0, n_test=0, size=64))
    prev = meta["splits"]["train"]["label_prevalence"]
    expected = {  # positive share: CheXpert-like targets, wide enough for 300 images
        "Support Devices": (0.35, 0.65), "Lung Opacity": (0.32, 0.6), "Pleural Effusion": (0.22, 0.5),
        "Edema": (0.12, 0.32), "Cardiomegaly": (0.05, 0.22), "Atelectasis": (0.07, 0.25),
        "Pneumothorax": (0.03, 0.17), "No Finding": (0.04, 0.16), "Lung Lesion": (0.005, 0.1),
    }  # fmt: skip
    for obs, (lo, hi) in expected.items():
        assert lo <= prev[obs]["positive"] <= hi, (obs, prev[obs])
    assert prev["Atelectasis"]["uncertain"] > 0.04 and prev["Edema"]["blank"] > 0.4
    with open(tmp_path / "phantom_meta.json") as f:
        assert json.load(f)["generator_version"] == phantom.GENERATOR_VERSION


def test_config_rejects_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match=r"synth\.conspicuity"):
        SynthConfig(conspicuity=0.0)
    with pytest.raises(ValueError, match=r"synth\.odd_mode_fraction"):
        SynthConfig(odd_mode_fraction=1.5)


# ------------------------------------------------------------------------------------------------ command
def test_synth_command_writes_the_tree_and_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    code = main(["synth", "--out", str(out), "--seed", "3", "--n-train", "3", "--n-valid", "2", "--n-test", "2",
                 "--size", "96", "--set", "synth.seed=9", "--set", "synth.lateral_fraction=1.0"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "Pleural Effusion" in printed and str(out) in printed and "images/s" in printed
    cfg = load_config("tiny", str(out / "config.yaml"))
    assert (cfg.synth.seed, cfg.synth.n_train, cfg.synth.size, cfg.synth.lateral_fraction) == (3, 3, 96, 1.0)
    _, rows = _read_csv(out / "train.csv")
    assert len(rows) == 6  # 3 frontal + 3 lateral
    for name in (
        "valid.csv",
        "test.csv",
        "gt_segmentations_test.json",
        "gt_annotations_valid.json",
        "phantom_meta.json",
    ):
        assert (out / name).is_file(), name
    # the explicit --seed won over --set synth.seed=9: the same files as a direct call with seed 3
    direct = tmp_path / "direct"
    phantom.generate(str(direct), SynthConfig(seed=3, n_train=3, n_valid=2, n_test=2, size=96, lateral_fraction=1.0))
    assert (direct / "valid.csv").read_bytes() == (out / "valid.csv").read_bytes()


def test_synth_command_reports_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path), "--size", "10"]) == 2
    assert "synth.size" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
