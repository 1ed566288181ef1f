"""The phantom generator: determinism, CheXpert/CheXlocalize formats, masks that match labels and pixels."""

from __future__ import annotations

import csv
import hashlib
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

from chexseg_dist import synth
from chexseg_dist.cli.main import main
from chexseg_dist.config.resolve import load_config
from chexseg_dist.config.sections import SynthConfig
from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS, TASKS, observation_for_task
from chexseg_dist.data.chexlocalize import polygons_to_mask
from chexseg_dist.data.images import decode_image

REPO = Path(__file__).resolve().parents[2]
SMALL = {"n_train": 8, "n_valid": 6, "n_test": 4, "size": 128, "lateral_fraction": 0.3, "odd_mode_fraction": 0.1}
CELLS = {"1.0", "0.0", "-1.0", ""}

# The generator's output, pinned. Recorded from the generator before it was split into modules (the single-file
# chexseg_dist/phantom.py, GENERATOR_VERSION "phantom-1.0"): if a test below fails, the generator's output changed,
# and then GENERATOR_VERSION must change too (and the values here be recorded again). phantom-1.1 added the expert
# annotator's files and new defaults; every image, CSV and exact ground-truth file kept its 1.0 bytes. The JPEG/PNG
# bytes also depend
# on the image codecs Pillow was built with, and phantom_meta.json on SynthConfig's fields.
PINNED_VERSION = "phantom-1.1"
PINNED_CFG = {"seed": 5, "n_train": 6, "n_valid": 3, "n_test": 3, "size": 96, "train_masks": True,
              "odd_mode_fraction": 0.5, "lateral_fraction": 0.5}  # fmt: skip
#: sha256 of every file of PINNED_CFG's dataset; image paths without the leading DATASET_DIR.
PINNED_SHA256 = {
    "test/patient64741/study1/view1_frontal.jpg": "bc49c22c6a5aeae5c82dbaffa8e8ed723fc60fcb0343488dd9bec68aec49d327",
    "test/patient64742/study1/view1_frontal.jpg": "4e4a02763bec8c21447e93e3a3b81039decdb149c195c0e35c745a7750bdbd8c",
    "test/patient64743/study1/view1_frontal.jpg": "cb0390648f69b141e64d6049b285febdf589a89ae098830b83bbcf4db377ad64",
    "train/patient00001/study1/view1_frontal.png": "39c9ef0a785f17787e0040e6e6fcf0bfd80f93d8e8d8ce08747630deb1629f4e",
    "train/patient00001/study1/view2_lateral.jpg": "b14cae1d0b160c7d76938abbbcafc5364c89db0fd7fd6bf7d89a324b7cb440d7",
    "train/patient00001/study2/view1_frontal.png": "20fd384e7b6296c385c72406bed625a0383f9a22175df960e673ce45e8237239",
    "train/patient00002/study1/view1_frontal.jpg": "533d60486655bca937c4c2352e57337089597fdb24f010bad247b2eb46e0a618",
    "train/patient00002/study1/view2_lateral.jpg": "8646688dd47fdbbe2a7dd05bdb8d5c6fc2674364a0351abf093e2dcd8b144ef7",
    "train/patient00002/study2/view1_frontal.jpg": "b0192ae77f3880d639b18b20e78e81d7b0b985005f2e7240d1689604db0f68b1",
    "train/patient00002/study3/view1_frontal.jpg": "028f7c0db9b2a3e7412c43326d4b371b953200defb9b0afcfc8c758fce06cc45",
    "train/patient00002/study3/view2_lateral.jpg": "8b974b4b98c817ce622c2f11d9f5c3ddd0bf2ed93569d599e29862204c543028",
    "train/patient00002/study4/view1_frontal.png": "b77dba3e4c5fb6277ee0d7defd0cf4834e29003e1a24d336d2a6ee92574eb501",
    "valid/patient64541/study1/view1_frontal.jpg": "d5c1160d8e806b3c314ae296c5c0d580d6fc0922078f8ad8cebabb0e5d9a0ec4",
    "valid/patient64542/study1/view1_frontal.jpg": "77ed61d815d3f9a3449e55fb75e628d5f1a55eee6be7256873a94ec38c03f4df",
    "valid/patient64543/study1/view1_frontal.jpg": "d62833e9260294c5bba107776eb341461614a0f67a946af86d008cb0e6c2d535",
    "gt_annotations_test.json": "bdf8010cd8148e180efbda3f5137da775252cff5bba21931ea890149c1f1f5a9",
    "gt_annotations_valid.json": "fbbf638e48c92fc4fb5672b6ea497c4ed229bd867c318cf9f644daa9af4ef5ab",
    "gt_segmentations_test.json": "38d25fa2080332f9e4467d391097914adbbf2a7162709feb2a3654dce8905524",
    "gt_segmentations_train.json": "1938cd286c12a8928ed07e558bb16d75e987a46bd40156eecf5c7f675c633436",
    "gt_segmentations_valid.json": "9c54a7e0821f5d82d92ec0c167009d2637d4bc749b011139c8548422201806fc",
    "expert_annotations_test.json": "712809a481a40c53d6b90e9861b5c08b4b11a9c65b4c65dfede479500950da45",
    "expert_annotations_valid.json": "54631ffe4b8675bb9fbcfb2a91e364a494dcd3adce179059b3d94fa81b4b2be0",
    "expert_segmentations_test.json": "522778f79fa74b7508b616c5d8f111d28fbc2600c23f3780b45ccfba1388b8f8",
    "expert_segmentations_valid.json": "84ce23e84d22f6ddd21b3b49061726541896d2c7b1c7ec8a3f873e0d9851fd06",
    "phantom_meta.json": "8c94119ec15a1db4d912d59ba4a632486ca96fefd6b21719282cf63d287e5428",
    "test.csv": "0218671dda140f73fbfccb6c66e5a0ccb4421b0e1786b4f7a7eb8441b87d9a1f",
    "train.csv": "032631b35f04ef1e0dbb53458da2afdd53a3bcaf5eff56949ce2c2c14db68ec9",
    "valid.csv": "2614840446695b8086bdc5f66e39c014ad265cf693a7b022ed16ccc90d102e82",
}
#: sha256 over two studies that show every finding (see test_every_finding_renders_the_pinned_pixels).
PINNED_ALL_FINDINGS_SHA256 = "a8d311e7b231f5f0222b9d6e4dfddcca9ad89bc51c203a4f6b5add89c5fcb6e8"
ALL_FINDINGS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "_patchy", "Edema", "Consolidation",
                "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                "Support Devices")  # fmt: skip


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
    synth.generate(str(out), SynthConfig(seed=7, **SMALL))
    return out


def _render(seed: int, present: dict[str, float], size: int = 160) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same patient, pose and exposure, with the given findings drawn."""
    anat = synth.sample_anatomy(np.random.default_rng(1000 + seed))
    study = synth.Study(present=dict(present), ap=False)
    img, masks, _ = synth.render_study(np.random.default_rng(seed), anat, study, size)
    return img, masks


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset: Path, tmp_path: Path) -> None:
    synth.generate(str(tmp_path), SynthConfig(seed=7, workers=2, **SMALL))
    a, b = _files(dataset), _files(tmp_path)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == []
    assert any(name.endswith(".jpg") for name in a) and "gt_segmentations_valid.json" in a


def test_workers_that_cannot_start_give_an_error_not_a_hang(tmp_path: Path) -> None:
    # A program read from stdin cannot be re-imported by spawned workers: they die at start-up. A
    # multiprocessing.Pool would replace them forever; the generator must stop with a message instead.
    script = (
        "from chexseg_dist.config.sections import SynthConfig\n"
        "from chexseg_dist.synth import generate\n"
        f"generate({str(tmp_path)!r}, SynthConfig(seed=7, workers=2, **{SMALL!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=180, cwd=str(REPO)
    )
    assert out.returncode != 0
    assert "phantom generator: a worker process died" in out.stderr and "run it from a file" in out.stderr


def test_output_bytes_are_pinned(tmp_path: Path) -> None:
    meta = synth.generate(str(tmp_path), SynthConfig(**PINNED_CFG))
    got = {
        rel.removeprefix(f"{synth.DATASET_DIR}/"): hashlib.sha256(data).hexdigest()
        for rel, data in _files(tmp_path).items()
    }
    changed = sorted(name for name in got.keys() | PINNED_SHA256.keys() if got.get(name) != PINNED_SHA256.get(name))
    assert changed == [], f"the generator's output changed (GENERATOR_VERSION too?): {changed}"
    assert meta["generator_version"] == synth.GENERATOR_VERSION == PINNED_VERSION


def test_every_finding_renders_the_pinned_pixels() -> None:
    # The tiny dataset above does not draw every finding; this pins each one's drawing, masks and label cells (the
    # image as 12-bit values, as the 16-bit PNGs store it).
    digest = hashlib.sha256()
    for seed, ap in ((0, True), (1, False)):
        anat = synth.sample_anatomy(np.random.default_rng(100 + seed))
        study = synth.Study(present=dict.fromkeys(ALL_FINDINGS, 0.6), ap=ap)
        img, masks, _ = synth.render_study(np.random.default_rng(seed), anat, study, 96, 1.0, False)
        digest.update(np.rint(img * 4095.0).astype("<u2").tobytes())
        for task in TASKS:
            digest.update(np.packbits(masks[task]).tobytes())
        digest.update(json.dumps(study.labels, sort_keys=True).encode())
    assert digest.hexdigest() == PINNED_ALL_FINDINGS_SHA256


def test_different_seed_gives_different_data(dataset: Path, tmp_path: Path) -> None:
    synth.generate(str(tmp_path), SynthConfig(seed=8, **SMALL))
    a, b = _files(dataset), _files(tmp_path)
    for name in ("train.csv", "valid.csv", "gt_segmentations_valid.json", "gt_annotations_test.json"):
        assert a[name] != b[name], name
    first = "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    assert a[first] != b[first]


# ------------------------------------------------------------------------------------------------ CheXpert CSVs
def test_csvs_have_the_chexpert_header_cells_and_paths(dataset: Path) -> None:
    for split in synth.SPLITS:
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
    synth.generate(str(tmp_path), SynthConfig(seed=1, n_train=3, n_valid=0, n_test=0, size=96, train_masks=True))
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
            anat = synth.sample_anatomy(np.random.default_rng(50 + seed))
            imgs = []
            for present in ({}, {"Pleural Effusion": 0.6}):
                study = synth.Study(present=dict(present), ap=False)
                img, masks, _ = synth.render_study(np.random.default_rng(seed), anat, study, 160, consp)
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
    meta = synth.generate(str(tmp_path), SynthConfig(seed=0, n_train=300, n_valid=0, n_test=0, size=64))
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
        assert json.load(f)["generator_version"] == synth.GENERATOR_VERSION


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
    synth.generate(str(direct), SynthConfig(seed=3, n_train=3, n_valid=2, n_test=2, size=96, lateral_fraction=1.0))
    assert (direct / "valid.csv").read_bytes() == (out / "valid.csv").read_bytes()


def test_synth_command_reports_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path), "--size", "10"]) == 2
    assert "synth.size" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
